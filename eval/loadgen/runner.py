"""The load generator: open-loop arrivals of multi-turn chat requests, streamed through ``openai``.

Owns ``LoadSpec`` (what to send), ``run_load`` / ``run_load_sync`` (send it and measure every
request: TTFT, TPOT, inter-token latencies, end-to-end latency, failures) and ``LoadResult``.
Each arrival sends the next turn of the oldest conversation whose previous turn has finished, or
else starts the next conversation of the workload; a turn's prompt is the whole history so far
(the model's own replies, or the dataset's with ``history="reference"``). Every planned request
ends up in ``records``: completed, failed (``error`` set) or cancelled at the drain deadline.
Simulated users (``FeedbackPolicy``) rate responses through ``POST /v1/feedback``.

A record (dict, JSON-ready) has: ``index`` (arrival order), ``label``, ``conv_id``, ``session``
(sequential per run), ``turn``, ``scheduled_s`` / ``start_s`` (seconds from the session start;
``start_s - scheduled_s`` is client-side lateness), ``ttft_s``, ``tpot_s`` ((e2e - ttft) /
(output_tokens - 1)), ``itl_s`` (gaps between content chunks), ``e2e_s``, ``prompt_tokens``,
``output_tokens``, ``cached_tokens`` (from ``usage``; radix hits when the server reports them),
``completion_id`` (the OpenAI ``id``), ``finish_reason``, ``error`` (None when it succeeded), and
with a feedback policy ``reward`` and ``feedback`` (None: no feedback given; else the outcome).
Must not import the server runtime or sglang (it talks HTTP only).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import httpx
import openai
from tqdm import tqdm

from eval.loadgen.arrivals import ArrivalSpec, arrival_times
from eval.loadgen.feedback import FeedbackPolicy, FeedbackTally
from eval.loadgen.stats import summarize_requests
from eval.loadgen.workloads import Conversation, messages_for_turn


@dataclass(frozen=True)
class LoadSpec:
    """What one load-generator session sends. Bounded by ``max_requests`` and ``duration_s`` (no
    request is sent after it); in-flight requests then get ``drain_s`` more before cancellation."""

    arrivals: ArrivalSpec
    max_requests: int
    duration_s: float = math.inf
    drain_s: float = 300.0
    max_turns: int = 4
    max_tokens: int = 64
    temperature: float = 0.0
    history: Literal["model", "reference"] = "model"
    max_concurrency: int | None = None  # requests in flight at once (extra arrivals queue client-side)
    max_sessions: int | None = None  # conversations open at once: "N users"; an arrival finding all N busy
    #                                  waits for one to become ready (recorded as lateness, start_s - scheduled_s)
    request_timeout_s: float = 600.0
    seed: int = 0
    conversation_offset: int = 0
    model: str | None = None  # None: the first id of GET /v1/models
    extra_body: dict[str, Any] = field(default_factory=dict)  # e.g. {"custom_params": {...}}
    label: str = ""


@dataclass
class LoadResult:
    label: str
    records: list[dict[str, Any]]  # one per planned request (see _Request.to_record)
    wall_s: float
    planned_requests: int
    feedback: dict[str, Any] | None
    replies: dict[int, str] = field(default_factory=dict, repr=False)  # index -> text, not saved

    def summary(self) -> dict[str, Any]:
        out = summarize_requests(self.records, self.wall_s)
        out["planned_requests"] = self.planned_requests
        if self.feedback is not None:
            out["feedback"] = self.feedback
        rewards = [r["reward"] for r in self.records if r.get("reward") is not None]
        if rewards:
            out["reward_mean"] = sum(rewards) / len(rewards)
        return out


@dataclass
class _Session:
    conv: Conversation
    session_id: int  # sequential per run; a conversation replayed again (workload wrapped) is a new session
    next_turn: int = 0
    replies: list[str] = field(default_factory=list)


async def get_model_name(base_url: str, timeout_s: float = 30.0) -> str:
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        resp = await client.get(f"{base_url}/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]


async def _one_request(
    client: openai.AsyncOpenAI, model: str, spec: LoadSpec, messages: list[dict[str, str]], t0: float
) -> tuple[dict[str, Any], str]:
    rec: dict[str, Any] = {"ttft_s": None, "tpot_s": None, "e2e_s": None, "itl_s": [], "error": None,
                           "prompt_tokens": None, "output_tokens": None, "cached_tokens": None,
                           "completion_id": None, "finish_reason": None}
    parts: list[str] = []
    start = time.perf_counter()
    rec["start_s"] = start - t0
    last = None
    chunks_with_text = 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=spec.max_tokens, temperature=spec.temperature,
            stream=True, stream_options={"include_usage": True}, extra_body=spec.extra_body or None,
        )
        async for chunk in stream:
            now = time.perf_counter()
            rec["completion_id"] = rec["completion_id"] or chunk.id
            if chunk.usage is not None:
                rec["prompt_tokens"] = chunk.usage.prompt_tokens
                rec["output_tokens"] = chunk.usage.completion_tokens
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                rec["cached_tokens"] = getattr(details, "cached_tokens", None) if details else None
            for choice in chunk.choices:
                if choice.finish_reason:
                    rec["finish_reason"] = choice.finish_reason
                text = choice.delta.content if choice.delta else None
                if text:
                    chunks_with_text += 1
                    parts.append(text)
                    if last is None:
                        rec["ttft_s"] = now - start
                    else:
                        rec["itl_s"].append(now - last)
                    last = now
        rec["e2e_s"] = time.perf_counter() - start
        if rec["output_tokens"] is None:
            rec["output_tokens"] = chunks_with_text
        if rec["ttft_s"] is None:
            rec["error"] = "no content tokens in stream"
        elif rec["output_tokens"] > 1:
            rec["tpot_s"] = (rec["e2e_s"] - rec["ttft_s"]) / (rec["output_tokens"] - 1)
    except (openai.APIError, httpx.HTTPError, asyncio.TimeoutError) as exc:
        rec["e2e_s"] = time.perf_counter() - start
        rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return rec, "".join(parts)


async def run_load(
    base_url: str,
    workload: Sequence[Conversation],
    spec: LoadSpec,
    feedback: FeedbackPolicy | None = None,
    progress: bool = True,
) -> LoadResult:
    """Runs one session against ``base_url`` (``http://host:port``, no ``/v1``); see module doc."""
    if not workload:
        raise ValueError("empty workload")
    model = spec.model or await get_model_name(base_url)
    times = arrival_times(spec.arrivals, spec.max_requests, spec.duration_s, spec.seed)
    rng = random.Random(spec.seed + 1)  # feedback draws; arrivals use their own RNG
    tally = FeedbackTally() if feedback is not None else None
    records: list[dict[str, Any]] = []
    replies: dict[int, str] = {}
    ready: collections.deque[_Session] = collections.deque()
    next_conv = spec.conversation_offset
    sem = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    bar = tqdm(total=len(times), desc=f"load {spec.label or base_url}", unit="req", disable=not progress, leave=False)
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", timeout=spec.request_timeout_s, max_retries=0)
    http = httpx.AsyncClient(timeout=30.0)

    async def issue(index: int, session: _Session, scheduled_s: float) -> None:
        turn = session.next_turn
        msgs = messages_for_turn(session.conv, turn, session.replies)
        if sem is not None:
            async with sem:
                rec, text = await _one_request(client, model, spec, msgs, t0)
        else:
            rec, text = await _one_request(client, model, spec, msgs, t0)
        rec.update(index=index, label=spec.label, conv_id=session.conv.conv_id, session=session.session_id,
                   turn=turn, scheduled_s=scheduled_s)
        records.append(rec)
        bar.update(1)
        if rec["error"] is not None:
            close_session()
            return
        replies[index] = text
        if feedback is not None and tally is not None:
            rec["reward"] = feedback.rule.reward(text)
            body = feedback.body(rec["completion_id"], text, rng)
            rec["feedback"] = None if body is None else await tally.post(http, base_url, body)
        ref = session.conv.reference_replies
        session.replies.append(ref[turn] if spec.history == "reference" and turn < len(ref) else text)
        session.next_turn += 1
        if session.next_turn < min(spec.max_turns, len(session.conv.human_turns)):
            ready.append(session)
            changed.set()
        else:
            close_session()

    def close_session() -> None:
        nonlocal open_sessions
        open_sessions -= 1
        changed.set()

    open_sessions = 0
    changed = asyncio.Event()  # a session became ready or closed
    tasks: list[asyncio.Task] = []
    t0 = time.perf_counter()
    try:
        for index, at in enumerate(times):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            while spec.max_sessions and not ready and open_sessions >= spec.max_sessions:
                changed.clear()
                left_s = spec.duration_s - (time.perf_counter() - t0)
                try:
                    await asyncio.wait_for(changed.wait(), timeout=None if math.isinf(left_s) else max(left_s, 0.0))
                except asyncio.TimeoutError:
                    break
            if time.perf_counter() - t0 >= spec.duration_s:
                break
            if ready:
                session = ready.popleft()
            else:
                session = _Session(workload[next_conv % len(workload)], next_conv - spec.conversation_offset)
                next_conv += 1
                open_sessions += 1
            tasks.append(asyncio.create_task(issue(index, session, at)))
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=spec.drain_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                task.result()  # re-raise bugs in issue(); request errors are already records
        wall_s = time.perf_counter() - t0
        done_idx = {r["index"] for r in records}
        for index in range(len(tasks)):
            if index not in done_idx:  # cancelled at the drain deadline
                records.append({"index": index, "label": spec.label, "error": "cancelled: drain deadline",
                                "start_s": None, "ttft_s": None, "tpot_s": None, "e2e_s": None, "itl_s": []})
    finally:
        bar.close()
        await client.close()
        await http.aclose()
    records.sort(key=lambda r: r["index"])
    return LoadResult(spec.label, records, wall_s, len(times), tally.summary() if tally else None, replies)


def run_load_sync(*args: Any, **kwargs: Any) -> LoadResult:
    """``run_load`` from synchronous code (experiments are synchronous)."""
    return asyncio.run(run_load(*args, **kwargs))


def with_label(spec: LoadSpec, label: str, **changes: Any) -> LoadSpec:
    return dataclasses.replace(spec, label=label, **changes)
