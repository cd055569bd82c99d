"""Driving the server's online training loop over HTTP (``/alchemist/train/*``, ``/alchemist/status``).

Owns: ``get_status`` / ``train_control`` (pause, resume) / ``set_replay``, ``CompletionSink`` (a ``FeedbackPolicy``
that posts nothing to ``/v1/feedback`` and instead hands each served completion id to a callback,
so ``run_load`` reports completions as they finish), ``SampleFeeder`` (a thread that posts those ids
to ``POST /alchemist/train/samples`` in small batches, backing off on 429, bounded by a count) and
the pure arithmetic over two status snapshots: ``counter_delta``, ``lag_delta``, ``coverage``,
``PublishLog`` (publish entries first seen after a baseline, with medians) and ``radix_hit_rate``.
Must not import the server runtime or sglang (HTTP only).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import httpx

from eval.loadgen.feedback import FeedbackPolicy
from eval.loadgen.stats import percentile


def get_status(base_url: str, timeout_s: float = 30.0) -> dict[str, Any]:
    reply = httpx.get(f"{base_url}/alchemist/status", timeout=timeout_s)
    reply.raise_for_status()
    return reply.json()


def train_control(base_url: str, action: str, timeout_s: float = 60.0) -> None:
    """``POST /alchemist/train/pause`` or ``/resume``; a clear error when the route is missing."""
    if action not in ("pause", "resume"):
        raise ValueError(f"unknown train action {action!r}")
    reply = httpx.post(f"{base_url}/alchemist/train/{action}", timeout=timeout_s)
    if reply.status_code == 404:
        raise RuntimeError(f"{base_url} has no POST /alchemist/train/{action} (is training wired?)")
    reply.raise_for_status()


def set_replay(base_url: str, enabled: bool, timeout_s: float = 60.0) -> dict[str, Any]:
    """``POST /alchemist/train/replay {"enabled": enabled}``: ``train.replay`` from the server's next
    round on. Returns its answer (``{"replay": bool, "current_round_replay": bool}``)."""
    reply = httpx.post(f"{base_url}/alchemist/train/replay", json={"enabled": bool(enabled)}, timeout=timeout_s)
    if reply.status_code == 404:
        raise RuntimeError(f"{base_url} has no POST /alchemist/train/replay (a server from before rounds?)")
    reply.raise_for_status()
    return reply.json()


def post_json(url: str, body: dict[str, Any], timeout_s: float = 30.0) -> tuple[int, Any]:
    """POSTs ``body``: (status code, the JSON answer or its text); (0, the error) when the request
    itself failed."""
    try:
        reply = httpx.post(url, json=body, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    try:
        return reply.status_code, reply.json()
    except ValueError:
        return reply.status_code, reply.text


@dataclass(frozen=True)

class CompletionSink(FeedbackPolicy):
    """Every successful completion's id goes to ``sink``; no ``/v1/feedback`` post is made
    (``body`` returns None, so records carry ``feedback: None``)."""

    probability: float = 1.0
    sink: Callable[[str], None] | None = None

    def body(self, completion_id: str, text: str, rng: random.Random) -> dict[str, Any] | None:
        if self.sink is not None and completion_id:
            self.sink(completion_id)
        return None


@dataclass
class SampleFeeder:
    """Posts ``{"completion_id": id, "rating": rating}`` samples for ids put with ``put`` while it
    runs (``start`` ... ``stop``), at most ``limit`` accepted in total across runs. 429: backs off
    (doubling up to ``max_backoff_s``) and retries the same batch until ``stop``; 422 / other
    errors: counted, the first message kept in ``errors``; 404: the route is missing (``errors``)."""

    base_url: str
    limit: int
    rating: str = "up"
    batch: int = 8
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    on_accepted: Callable[[int], None] | None = None  # called with the running total
    post: Callable[[list[dict[str, Any]]], tuple[int, Any]] | None = None  # tests: fake transport
    accepted: int = 0
    posted: int = 0
    retries_429: int = 0
    rejected: int = 0
    dropped: int = 0  # ids never accepted: queue left at stop, or over the limit
    errors: list[str] = field(default_factory=list)
    _queue: "queue.Queue[str]" = field(default_factory=queue.Queue, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def put(self, completion_id: str) -> None:
        self._queue.put(completion_id)

    @property
    def full(self) -> bool:
        return self.accepted >= self.limit

    def _http_post(self, samples: list[dict[str, Any]]) -> tuple[int, Any]:
        return post_json(f"{self.base_url}/alchemist/train/samples", {"samples": samples})

    def _take(self, wait_s: float) -> list[str]:
        ids: list[str] = []
        try:
            ids.append(self._queue.get(timeout=wait_s))
            while len(ids) < self.batch:
                ids.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return ids

    def send(self, ids: Sequence[str]) -> None:
        """Posts ``ids`` (one batch) until accepted, refused, or ``stop``; synchronous."""
        ids = list(ids[: max(0, self.limit - self.accepted)])
        samples = [{"completion_id": i, "rating": self.rating} for i in ids]
        backoff = self.backoff_s
        while samples:
            code, payload = (self.post or self._http_post)(samples)
            self.posted += 1
            if code == 200:
                n = int(payload.get("accepted", len(samples))) if isinstance(payload, dict) else len(samples)
                self.accepted += n
                self.dropped += len(samples) - n
                if self.on_accepted is not None and n:
                    self.on_accepted(self.accepted)
                return
            if code == 429 and not self._stop.is_set():
                self.retries_429 += 1
                self._stop.wait(backoff)
                backoff = min(2 * backoff, self.max_backoff_s)
                continue
            if code != 429:
                self.rejected += len(samples)
                if len(self.errors) < 5:
                    self.errors.append(f"http {code}: {str(payload)[:300]}")
            else:
                self.dropped += len(samples)
            return

    def _loop(self) -> None:
        while not self._stop.is_set():
            ids = self._take(0.1)
            if ids and not self.full:
                self.send(ids)
            else:
                self.dropped += len(ids)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="eval-sample-feeder", daemon=True)
        self._thread.start()

    def stop(self, drain_s: float = 5.0) -> None:
        """Waits up to ``drain_s`` for queued ids to be posted, then stops; the rest is dropped."""
        deadline = time.monotonic() + drain_s
        while not self._queue.empty() and not self.full and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60.0)
        self._thread = None
        while True:
            try:
                self._queue.get_nowait()
                self.dropped += 1
            except queue.Empty:
                return

    def summary(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "posts": self.posted, "retries_429": self.retries_429,
                "rejected": self.rejected, "dropped": self.dropped, "errors": list(self.errors)}


# ------------------------------------------------------------------------- status arithmetic (pure)
def counter_delta(before: Mapping[str, Any], after: Mapping[str, Any], key: str) -> float:
    """``after[key] - before[key]`` for a numeric counter (missing counts as 0)."""
    return float(after.get(key) or 0) - float(before.get(key) or 0)


def _lag_key(k: str) -> tuple[int, float | str]:
    try:
        return (0, float(k))
    except ValueError:
        return (1, k)


def lag_delta(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> dict[str, int]:
    """``reuse_by_lag`` tokens added between two snapshots (string keys, sorted by lag, zeros dropped)."""
    b = {str(k): int(v) for k, v in (before or {}).items()}
    a = {str(k): int(v) for k, v in (after or {}).items()}
    out = {k: a[k] - b.get(k, 0) for k in a}
    return {k: out[k] for k in sorted(out, key=_lag_key) if out[k]}


def coverage(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, float]:
    """From two ``train`` sections: ``lag0`` = prompt tokens replayed at lag 0 / all prompt tokens
    trained (replayed + recomputed), ``any_lag`` = replayed at any lag / all; NaN when none trained.
    Without ``reuse_by_lag`` every replayed token counts as lag 0."""
    replayed = counter_delta(before, after, "replayed_tokens")
    total = replayed + counter_delta(before, after, "recomputed_tokens")
    lags = lag_delta(before.get("reuse_by_lag"), after.get("reuse_by_lag"))
    lag0 = float(lags.get("0", 0)) if "reuse_by_lag" in after else replayed
    if total <= 0:
        return {"lag0": float("nan"), "any_lag": float("nan"), "prompt_tokens": 0.0}
    return {"lag0": lag0 / total, "any_lag": replayed / total, "prompt_tokens": total}


@dataclass
class PublishLog:
    """``publish.recent`` entries first seen after the baseline snapshot (deduplicated by version).
    Feed it every snapshot: the server keeps only the last 64 entries."""

    baseline: set[str] = field(default_factory=set)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def starting_at(cls, publish: Mapping[str, Any] | None) -> "PublishLog":
        return cls({str(e.get("version")) for e in (publish or {}).get("recent") or []})

    def add(self, publish: Mapping[str, Any] | None) -> None:
        for e in (publish or {}).get("recent") or []:
            v = str(e.get("version"))
            if v not in self.baseline:
                self.entries.setdefault(v, dict(e))

    def median(self, key: str) -> float:
        return percentile([float(e[key]) for e in self.entries.values() if e.get(key) is not None], 50)


def radix_hit_rate(records: Sequence[Mapping[str, Any]]) -> float:
    """Sum of ``cached_tokens`` / sum of ``prompt_tokens`` over successful requests that report
    both; NaN when none do."""
    ok = [r for r in records
          if r.get("error") is None and r.get("prompt_tokens") and r.get("cached_tokens") is not None]
    prompt = sum(int(r["prompt_tokens"]) for r in ok)
    return sum(int(r["cached_tokens"]) for r in ok) / prompt if prompt else float("nan")
