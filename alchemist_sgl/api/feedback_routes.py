"""Feedback routes of alchemist-sgl (docs/api.md), run in SGLang's HTTP process.

Owns ``POST /v1/feedback``, ``POST /v1/feedback/batch``, ``GET``/``DELETE /v1/feedback/{completion_id}``
and the admin ``GET /alchemist/export/kto``, plus the per-key feedback rate limit, and the
interfaces of the injected feedback store and completion log (``FeedbackStore``,
``CompletionLookup``). Every call to them runs in a worker thread (``asyncio.to_thread``, or
Starlette's thread pool for the streamed export), never on the event loop. The body schemas live in
``schemas.py``, the key check in ``http.guard``. Imports no sglang and nothing of ``integration/``.

Note [feedback order]: a POST is checked in this order: key (401), body size (413), fields (422),
rate limit (429, only requests with valid bodies count), then in one worker-thread call the pending
queue (429), the completion's state (404 / 409 / 410; choice 0 first, since all choices of a response
finish before its final chunk), ``choice_index`` against the logged choices (422) and
``store.submit``, which commits before it returns: the 200 is sent only after that. The answer is the
store's ``answer``, so a repeated ``feedback_id`` gets the first answer; a ``FeedbackInvalid`` from
the store (a ``feedback_id`` used under another key) answers 422 naming its field.

Note [feedback auth]: with ``api_key`` set (SGLang's ``--api-key``) the feedback routes require
``Authorization: Bearer <api_key>`` (401 otherwise, compared in constant time). The export requires
``admin_api_key`` when set, else ``api_key`` when set (SGLang's ``ADMIN_OPTIONAL`` rule: the export
holds every user's text). ``mark_feedback_endpoint`` / ``mark_admin_endpoint`` (SGLang's
``auth_level`` markers, injected by ``integration/``) tell SGLang's own key middleware which key each
route takes. The store sees only ``sha256(key)`` (``api_key_hash``), never the key.

Note [feedback rate limit]: ``rate_limit_per_minute`` bounds feedback items (a batch of n counts n)
per sliding 60 s window of the injected clock, per key: the api key's hash, or the client host when
no key is set. Over it: 429 with ``Retry-After`` (whole seconds until enough of the window has
passed). A batch larger than the limit could never pass: 422 naming ``feedback``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import time
from collections import deque
from typing import Any, Callable, Generic, Iterator, Literal, Protocol, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from alchemist_sgl.api.http import BearerKey, EndpointMarker, Refusal, RouteGuard, guard, read_json
from alchemist_sgl.api.schemas import FieldError, check_completion_id, join_path, normalize_batch, normalize_feedback
from alchemist_sgl.errors import FeedbackInvalid
from alchemist_sgl.feedback.rows import FeedbackInput, FeedbackResult

CompletionState = Literal["running", "finished", "expired"]
Detokenize = Callable[[list[int]], str]

RATE_WINDOW_S = 60.0
QUEUE_FULL_RETRY_AFTER_S = 5
EXPORT_ROWS_PER_CHUNK = 64


class CompletionLookup(Protocol):
    """The completion log as the feedback routes read it. Called from worker threads, concurrently."""

    def state(self, rid: str, choice_index: int = 0) -> CompletionState | None:
        """None for an id never logged; ``"expired"`` for a purged one (its tombstone)."""

    def choices(self, rid: str) -> int:
        """How many choices of completion ``rid`` are logged."""


C = TypeVar("C", bound=CompletionLookup)
C_contra = TypeVar("C_contra", bound=CompletionLookup, contravariant=True)


class FeedbackStore(Protocol[C_contra]):
    """The durable feedback store (feedback/ratings.py), whose export reads the completion log the
    routes are given (``C_contra``). Called from worker threads, concurrently."""

    def submit(self, fb: FeedbackInput) -> FeedbackResult:
        """Commits ``fb`` before returning (last wins per completion choice; a repeated
        ``feedback_id`` counts once and returns the first answer)."""

    def get(self, completion_id: str) -> list[dict[str, Any]]:
        """The stored feedback rows of one completion (JSON-serializable)."""

    def delete(self, completion_id: str) -> int:
        """Deletes the feedback of one completion; returns how many rows were deleted."""

    def pending_count(self) -> int:
        """Feedback stored but not yet trained."""

    def export_kto(self, completions: C_contra, detokenize: Detokenize) -> Iterator[dict[str, Any]]:
        """TRL KTO rows ``{"prompt", "completion", "label"}``, lazily."""


def hash_api_key(key: str) -> str:
    """What the store keeps instead of a key: its sha256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class SlidingWindowLimiter:
    """At most ``limit`` events per ``window_s`` seconds per key, on the injected clock. Not
    thread-safe: used only on the event loop."""

    def __init__(self, limit: int, clock: Callable[[], float], window_s: float = RATE_WINDOW_S) -> None:
        assert limit >= 1, limit
        self.limit, self.clock, self.window_s = limit, clock, window_s
        self._events: dict[str, deque[float]] = {}
        self._sweep_at_keys = 1024

    def admit(self, key: str, count: int = 1) -> float | None:
        """Records ``count`` events now and returns None, or records nothing and returns the seconds
        until ``count`` more would fit (``count`` must be <= ``limit``)."""
        assert 1 <= count <= self.limit, (count, self.limit)
        now = self.clock()
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - self.window_s:
            events.popleft()
        excess = len(events) + count - self.limit
        if excess > 0:
            return events[excess - 1] + self.window_s - now
        events.extend([now] * count)
        if len(self._events) >= self._sweep_at_keys:
            self._sweep(now)
        return None

    def _sweep(self, now: float) -> None:
        self._events = {key: events for key, events in self._events.items()
                        if events and events[-1] > now - self.window_s}
        self._sweep_at_keys = max(1024, 2 * len(self._events))


class FeedbackIntake(Generic[C]):
    """The submit path behind ``POST /v1/feedback`` and ``/batch`` (Notes [feedback order],
    [feedback rate limit]): the rate limit, the queue and completion checks, the store, and the
    answer counts by HTTP status."""

    def __init__(self, store: FeedbackStore[C], completions: C, *, key_hash: str | None,
                 max_pending: int, limiter: SlidingWindowLimiter | None, counts: dict[int, int]) -> None:
        self.store, self.completions, self.key_hash = store, completions, key_hash
        self.max_pending, self.limiter, self.counts = max_pending, limiter, counts

    def count(self, code: int) -> None:
        self.counts[code] = self.counts.get(code, 0) + 1

    def check_rate(self, request: Request, count: int) -> None:
        """On the event loop: 422 for a batch larger than the limit, 429 over it."""
        limiter = self.limiter
        if limiter is None:
            return
        if count > limiter.limit:
            raise FieldError("feedback", f"at most {limiter.limit} items per batch: the feedback rate "
                                         f"limit is {limiter.limit} per minute")
        client = request.client.host if request.client is not None else "unknown"
        wait_s = limiter.admit(self.key_hash or f"host:{client}", count)
        if wait_s is not None:
            retry_after_s = max(1, math.ceil(wait_s))
            raise Refusal(429, {"error": f"feedback rate limit exceeded ({limiter.limit} per minute); "
                                         f"retry in {retry_after_s} s"},
                          headers={"Retry-After": str(retry_after_s)})

    def submit_all(self, items: list[FeedbackInput], paths: list[str]) -> list[FeedbackResult | Refusal]:
        """Runs in a worker thread: queue check, then per item the completion checks and submit."""
        pending = self.store.pending_count()
        if pending + len(items) > self.max_pending:
            raise Refusal(429, {"error": f"pending queue full: {pending} feedback pending (at most "
                                         f"{self.max_pending}); retry once training has caught up"},
                          headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})
        outcomes: list[FeedbackResult | Refusal] = []
        for item, path in zip(items, paths):
            refusal = _completion_refusal(self.completions, item.completion_id, item.choice_index, path)
            if refusal is None:
                try:
                    outcomes.append(self.store.submit(dataclasses.replace(item, api_key_hash=self.key_hash)))
                    continue
                except FeedbackInvalid as exc:  # e.g. a feedback_id used under another key
                    refusal = Refusal.of_field(FieldError(join_path(path, exc.field), _message(exc)))
            outcomes.append(refusal)
        return outcomes


def build_feedback_router(store: FeedbackStore[C], completions: C, *,
                          api_key: str | None, max_body_bytes: int, max_pending: int,
                          rate_limit_per_minute: int | None, detokenize: Detokenize | None,
                          admin_api_key: str | None = None,
                          mark_feedback_endpoint: EndpointMarker | None = None,
                          mark_admin_endpoint: EndpointMarker | None = None,
                          answer_counts: dict[int, int] | None = None,
                          clock: Callable[[], float] = time.monotonic) -> APIRouter:
    """The feedback routes (module docstring; Notes [feedback order], [feedback auth]). ``store`` and
    ``completions`` must be safe to call from several worker threads at once. ``detokenize`` None
    makes the export answer 503. ``rate_limit_per_minute`` None turns the rate limit off.
    ``answer_counts``: HTTP status -> count of feedback answers (one per submitted item), for
    ``alchemist_feedback_answers_total`` on ``/metrics``."""
    router = APIRouter()
    limiter = SlidingWindowLimiter(rate_limit_per_minute, clock) if rate_limit_per_minute else None
    intake = FeedbackIntake(store, completions, key_hash=hash_api_key(api_key) if api_key else None,
                            max_pending=max_pending, limiter=limiter,
                            counts=answer_counts if answer_counts is not None else {})
    user_key = BearerKey(api_key, "API key", "--api-key")
    # as SGLang's ADMIN_OPTIONAL level: the admin key wins, else the api key
    export_key = BearerKey(admin_api_key or api_key, "key", "--admin-api-key" if admin_api_key else "--api-key")
    _add_submit_routes(router, guard(user_key, mark=mark_feedback_endpoint, on_refused=intake.count),
                       intake, max_body_bytes)
    _add_read_routes(router, guard(user_key, mark=mark_feedback_endpoint), store, completions)
    _add_export_route(router, guard(export_key, mark=mark_admin_endpoint), store, completions, detokenize)
    return router


def _add_submit_routes(router: APIRouter, user: RouteGuard, intake: FeedbackIntake[C],
                       max_body_bytes: int) -> None:
    """``POST /v1/feedback`` and ``/batch``; every answer is counted (``user`` counts refusals)."""
    @router.post("/v1/feedback")
    @user
    async def feedback_submit(request: Request) -> JSONResponse:
        item = normalize_feedback(await read_json(request, max_body_bytes))
        intake.check_rate(request, 1)
        [outcome] = await asyncio.to_thread(intake.submit_all, [item], [""])
        if isinstance(outcome, Refusal):
            intake.count(outcome.status_code)
            return outcome.response()
        intake.count(200)
        return JSONResponse(content=outcome.answer)

    @router.post("/v1/feedback/batch")
    @user
    async def feedback_submit_batch(request: Request) -> JSONResponse:
        items = normalize_batch(await read_json(request, max_body_bytes))
        intake.check_rate(request, len(items))
        paths = [f"feedback[{i}]" for i in range(len(items))]
        outcomes = await asyncio.to_thread(intake.submit_all, items, paths)
        for outcome in outcomes:
            intake.count(outcome.status_code if isinstance(outcome, Refusal) else 200)
        results = [outcome.answer if not isinstance(outcome, Refusal)
                   else {**outcome.content, "status_code": outcome.status_code} for outcome in outcomes]
        return JSONResponse(content={"results": results})


def _add_read_routes(router: APIRouter, user: RouteGuard, store: FeedbackStore[C], completions: C) -> None:
    """``GET`` and ``DELETE /v1/feedback/{completion_id}``."""
    @router.get("/v1/feedback/{completion_id}")
    @user
    async def feedback_read(completion_id: str, request: Request) -> JSONResponse:
        def read() -> tuple[list[dict[str, Any]], bool]:
            rows = store.get(completion_id)
            return rows, bool(rows) or completions.state(completion_id) is not None
        check_completion_id(completion_id)
        rows, is_known = await asyncio.to_thread(read)
        if not is_known:
            return _STATE_REFUSALS[None](completion_id).response()
        return JSONResponse(content={"completion_id": completion_id, "feedback": rows})

    @router.delete("/v1/feedback/{completion_id}")
    @user
    async def feedback_delete(completion_id: str, request: Request) -> JSONResponse:
        check_completion_id(completion_id)
        deleted = await asyncio.to_thread(store.delete, completion_id)
        return JSONResponse(content={"completion_id": completion_id, "deleted": deleted})


def _add_export_route(router: APIRouter, admin: RouteGuard, store: FeedbackStore[C], completions: C,
                      detokenize: Detokenize | None) -> None:
    """``GET /alchemist/export/kto`` (JSONL; 503 without a tokenizer)."""
    @router.get("/alchemist/export/kto")
    @admin
    async def export_kto(request: Request) -> Response:
        if detokenize is None:
            return JSONResponse(status_code=503, content={
                "error": "the KTO export needs the tokenizer, which this server runs without"})
        # a sync iterator: Starlette runs each next() in its thread pool, off the event loop
        return StreamingResponse(_jsonl_chunks(store, completions, detokenize), media_type="application/jsonl")


def _completion_refusal(completions: CompletionLookup, rid: str, choice_index: int, path: str) -> Refusal | None:
    """None when feedback may land on choice ``choice_index`` of ``rid`` (Note [feedback order])."""
    state = completions.state(rid, 0)
    if state != "finished":
        return _STATE_REFUSALS[state](rid)
    if choice_index == 0:
        return None
    logged = completions.choices(rid)
    if choice_index >= logged:
        return Refusal.of_field(FieldError(join_path(path, "choice_index"), f"must be below {logged}: "
                                            f"completion {rid!r} has {logged} logged choice(s)"))
    state = completions.state(rid, choice_index)
    return None if state == "finished" else _STATE_REFUSALS[state](rid)


_STATE_REFUSALS: dict[CompletionState | None, Callable[[str], Refusal]] = {
    None: lambda rid: Refusal(404, {"error": f"unknown completion_id {rid!r}: use the `id` of a chat "
                                              "or completions response from this server"}),
    "running": lambda rid: Refusal(409, {"error": f"completion {rid!r} is still streaming: retry once "
                                                   "the response has finished (after its final chunk, "
                                                   "`data: [DONE]` when streaming)"}),
    "expired": lambda rid: Refusal(410, {"error": f"completion {rid!r} has expired: its log entry was "
                                                   "purged (feedback.completion_ttl_s)"}),
}


def _jsonl_chunks(store: FeedbackStore[C], completions: C, detokenize: Detokenize) -> Iterator[bytes]:
    """The export as JSONL bytes, ``EXPORT_ROWS_PER_CHUNK`` rows per chunk. The store is first called
    on the first ``next()``, so even an eager ``export_kto`` runs in the thread pool."""
    lines: list[str] = []
    for row in store.export_kto(completions, detokenize):
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        if len(lines) >= EXPORT_ROWS_PER_CHUNK:
            yield "".join(lines).encode("utf-8")
            lines = []
    if lines:
        yield "".join(lines).encode("utf-8")


def _message(exc: FeedbackInvalid) -> str:
    """The store's message without its ``feedback field '<name>': `` prefix."""
    return str(exc).split(": ", 1)[-1]
