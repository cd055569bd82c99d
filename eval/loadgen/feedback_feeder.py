"""Simulated users who rate each served completion after a delay, through ``POST /v1/feedback``.

Owns ``FeedbackFeeder``: ``put(completion_id)`` (called when a completion has finished streaming,
e.g. from ``CompletionSink``) stamps the completion, draws its delay (exponential with mean
``delay_mean_s``; 0 = at once) and queues it; ``pump(now)`` posts every item due by ``now`` as
``{"completion_id": id, "rating": rating}``; ``start`` / ``stop`` run ``pump`` on a thread, and
``stop`` posts what is due, then drops what is still waiting (counted in ``unsent``). Answers: 200
accepted; 409 (the completion is still streaming) and transport errors are retried after
``retry_s`` up to ``max_tries``; 429 is retried with a doubling back-off; anything else is
``rejected`` (a 404 from the route itself: the server has no feedback route).
``stamp_to_feedback_s`` of an accepted item is (start of the accepted POST) - (its stamp), on
``clock``. Must not import the server runtime or sglang (HTTP only).
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from eval.loadgen.feedback import ROUTE_NOT_FOUND_BODY
from eval.loadgen.training import post_json
from eval.loadgen.stats import percentile

Post = Callable[[dict[str, Any]], tuple[int, Any]]  # body -> (HTTP status, 0 on transport error; payload)


@dataclass(order=True)
class _Item:
    due: float
    seq: int
    completion_id: str = field(compare=False)
    stamped: float = field(compare=False)
    tries: int = field(default=0, compare=False)
    backoff_s: float = field(default=0.0, compare=False)


@dataclass
class FeedbackFeeder:
    base_url: str
    delay_mean_s: float = 0.0
    rating: str = "up"
    seed: int = 0
    retry_s: float = 0.25
    max_tries: int = 20
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    tick_s: float = 0.05
    clock: Callable[[], float] = time.monotonic
    post: Post | None = None  # tests: a fake transport
    on_accepted: Callable[[int], None] | None = None  # called with the running total
    accepted: int = 0
    posts: int = 0
    retries: int = 0
    rejected: int = 0
    unsent: int = 0
    errors: list[str] = field(default_factory=list)
    delays_s: list[float] = field(default_factory=list)
    stamp_to_feedback_s: list[float] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)  # clock() at the start of each accepted POST
    _heap: list[_Item] = field(default_factory=list, repr=False)
    _seq: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.delay_mean_s < 0:
            raise ValueError(f"feedback delay must be >= 0 s, got {self.delay_mean_s}")
        self._rng = random.Random(self.seed)

    def draw_delay(self) -> float:
        """One user's delay: exponential with mean ``delay_mean_s`` (0: none)."""
        return self._rng.expovariate(1.0 / self.delay_mean_s) if self.delay_mean_s > 0 else 0.0

    def put(self, completion_id: str) -> None:
        if not completion_id:
            return
        now, delay = self.clock(), self.draw_delay()
        with self._lock:
            self.delays_s.append(delay)
            self._seq += 1
            heapq.heappush(self._heap, _Item(now + delay, self._seq, completion_id, now))

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._heap)

    def _http_post(self, body: dict[str, Any]) -> tuple[int, Any]:
        return post_json(f"{self.base_url}/v1/feedback", body)

    def _due(self, now: float) -> list[_Item]:
        with self._lock:
            out = []
            while self._heap and self._heap[0].due <= now:
                out.append(heapq.heappop(self._heap))
            return out

    def _again(self, item: _Item, at: float) -> None:
        self.retries += 1
        item.due = at
        with self._lock:
            heapq.heappush(self._heap, item)

    def _refuse(self, code: int, payload: Any) -> None:
        self.rejected += 1
        if len(self.errors) < 5:
            what = "feedback route unavailable" if code == 404 and payload == ROUTE_NOT_FOUND_BODY else f"http {code}"
            self.errors.append(f"{what}: {str(payload)[:300]}")

    def _send(self, item: _Item) -> None:
        sent = self.clock()
        code, payload = (self.post or self._http_post)({"completion_id": item.completion_id, "rating": self.rating})
        self.posts += 1
        item.tries += 1
        if code == 200:
            self.accepted += 1
            self.stamp_to_feedback_s.append(sent - item.stamped)
            self.accepted_at.append(sent)
            if self.on_accepted is not None:
                self.on_accepted(self.accepted)
        elif code == 429:
            item.backoff_s = min(self.max_backoff_s, 2 * item.backoff_s if item.backoff_s else self.backoff_s)
            self._again(item, self.clock() + item.backoff_s)
        elif code in (0, 409) and item.tries < self.max_tries:
            self._again(item, self.clock() + self.retry_s)
        else:
            self._refuse(code, payload)

    def pump(self, now: float) -> int:
        """Posts every item due by ``now`` (synchronously); returns how many were posted."""
        items = self._due(now)
        for item in items:
            self._send(item)
        return len(items)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.pump(self.clock())

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="eval-feedback-feeder", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Stops the thread, posts what is due by now, and drops the items not yet due (counted in
        ``unsent``; returned). Retries still waiting count as unsent too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60.0)
        self._thread = None
        self.pump(self.clock())
        with self._lock:
            dropped, self._heap = len(self._heap), []
        self.unsent += dropped
        return dropped

    def summary(self) -> dict[str, Any]:
        drawn = self.delays_s
        return {"accepted": self.accepted, "posts": self.posts, "retries": self.retries,
                "rejected": self.rejected, "unsent": self.unsent, "errors": list(self.errors),
                "delay_mean_s": self.delay_mean_s,
                "delay_drawn_mean_s": sum(drawn) / len(drawn) if drawn else None,
                "stamp_to_feedback_s": {"p50": percentile(self.stamp_to_feedback_s, 50),
                                        "p90": percentile(self.stamp_to_feedback_s, 90)}}
