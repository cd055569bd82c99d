"""The sglang side of the online loop: hooks that train between scheduler iterations.

Owns the class-level hooks (registered once per process by ``plugin.load``) and ``served_model``,
the view of the served model (its own parameters, tokenizer, serving host, pressure and KV pool)
that the composition root (runtime.py) builds the online loop over.

Hooks (all in SGLang's scheduler process; Note [fail loudly, keep serving] in plugin.py):
  * AFTER ``Scheduler.process_batch_result`` and AFTER ``Scheduler.on_idle``: one slice of work
    units, ``train.slice_budget_ms`` while requests wait or run, ``train.idle_slice_ms`` otherwise.
    With ``--disable-overlap-schedule`` (required, checked at startup) both points are quiescent.
  * AROUND ``Scheduler.maybe_sleep_on_idle``: skips SGLang's idle sleep while training has work.
  * BEFORE ``Req.init_next_round_input``: Note [Version stamp].
  * BEFORE ``SchedulerOutputStreamer.stream_output``: finished completions go into the log, and
    each request's first token feeds the arbiter's TTFT window (Note [Scheduler TTFT]).
  * AFTER ``Scheduler.handle_shutdown``: a checkpoint within SGLang's 15 s exit window.

Note [Version stamp]: the radix namespace of a request is its ``extra_key``. At admission
(``init_next_round_input``, where the final prefix match happens), a request that holds no KV yet
gets ``extra_key = "wv=<serving version>|" + its own key``; so do requests that waited in the
queue (or the grammar queue) across a publish, since they are admitted later. Requests that hold
KV (running, chunked) are never re-stamped. KV computed under another version is never matched;
old namespaces age out of the radix cache by LRU. The stamped version is also the prefill version
the completion log keeps, and the store namespace recordings go to.

Note [Scheduler TTFT]: the arbiter's TTFT is what the scheduler adds to a request's first token:
``time_stats.prefill_finished_time - time_stats.scheduler_recv_time`` (both ``perf_counter``, set
by SGLang whether or not metrics are on): the wait in the queue, every training slice that ran
meanwhile, and the prefill. Tokenization and the HTTP hop are outside the scheduler and are not
in it. Read before ``stream_output`` of the batch that produced the token, so the arbiter's
decision of that same iteration sees it; each request is counted once (a retracted request that
prefills again is not counted twice).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from alchemist_sgl.config import Config
from alchemist_sgl.integration.served_model import check_in_place_safe, served_weights
from alchemist_sgl.log import get_logger
from alchemist_sgl.memory.arbiter import ServingPressure, kv_free_fraction
from alchemist_sgl.memory.status import KvPoolView
from alchemist_sgl.feedback.completion_entry import CompletionEntry
from alchemist_sgl.runtime import Runtime, RuntimeState, ServedModel
from alchemist_sgl.train.weights import BaseWeights

logger = get_logger(__name__)

_SCHED = "sglang.srt.managers.scheduler.Scheduler"
_REQ = "sglang.srt.managers.schedule_batch.Req"
_STREAMER = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
_TIME_STATS = "sglang.srt.observability.req_time_stats.SchedulerReqTimeStats"
_ALLOCATOR = "sglang.srt.mem_cache.allocator.base.BaseTokenToKVPoolAllocator"
NONFINITE_ENV = "ALCHEMIST_SGL_INJECT_NONFINITE_STEPS"  # tests: comma-separated attempt numbers

SGLANG_NAMES = (
    f"{_SCHED}.process_batch_result", f"{_SCHED}.on_idle", f"{_SCHED}.maybe_sleep_on_idle",
    f"{_SCHED}.handle_shutdown", f"{_SCHED}.record_weight_version_change",
    f"{_SCHED}.handle_generate_request",
    f"{_REQ}.init_next_round_input", f"{_REQ}.output_ids_through_stop", f"{_REQ}.finished",
    f"{_STREAMER}.stream_output",
    "sglang.srt.utils.weight_versions.compute_weight_version_spans",
    f"{_TIME_STATS}.prefill_finished_time", f"{_TIME_STATS}.scheduler_recv_time",
    f"{_ALLOCATOR}.get_kvcache", f"{_ALLOCATOR}.available_size",
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.get_kv_size_bytes",
)
SGLANG_INSTANCE_ATTRIBUTES = (
    f"{_SCHED}.chunked_req", f"{_SCHED}.waiting_queue", f"{_SCHED}.running_batch",
    f"{_SCHED}.tokenizer", f"{_SCHED}.token_to_kv_pool_allocator", f"{_SCHED}.tree_cache",
    f"{_REQ}.kv", f"{_REQ}.extra_key", f"{_REQ}.finished_reason",
    f"{_REQ}.cached_tokens", f"{_REQ}.logprob", f"{_REQ}.weight_version_events",
    f"{_REQ}.time_stats", f"{_SCHED}.max_total_num_tokens",
)

_STAMP_ATTR, _BASE_KEY_ATTR = "_alchemist_prefill_version", "_alchemist_base_extra_key"


class ProcessHolder:
    """The runtime of this process, for class-level hooks (set once the scheduler is built)."""

    runtime: Runtime | None = None


def register_hooks(holder: ProcessHolder) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

    def guarded(feature: str, fn: Callable[..., None]) -> Callable[..., None]:
        def run(*args: Any, **kwargs: Any) -> None:
            rt = holder.runtime
            if rt is None or rt.is_disabled(feature):
                return None
            try:
                fn(rt, *args, **kwargs)
            except Exception as exc:
                logger.exception("%s hook failed", feature)
                rt.disable(feature, f"{type(exc).__name__}: {exc}")
            return None
        return run

    HookRegistry.register(f"{_SCHED}.process_batch_result",
                          guarded("train", lambda rt, result, sched, *a, **k: rt.on_train_slot(
                              is_busy=True)), HookType.AFTER)
    HookRegistry.register(f"{_SCHED}.on_idle", guarded("train", lambda rt, result, sched, *a, **k:
                          rt.on_train_slot(is_busy=len(sched.waiting_queue) > 0)), HookType.AFTER)
    HookRegistry.register(f"{_SCHED}.handle_shutdown",
                          guarded("train", lambda rt, result, sched, *a, **k: rt.on_shutdown()),
                          HookType.AFTER)
    HookRegistry.register(f"{_REQ}.init_next_round_input",
                          guarded("versions", lambda rt, req, *a, **k: _stamp(rt, req)),
                          HookType.BEFORE)
    HookRegistry.register(f"{_SCHED}.handle_generate_request",
                          guarded("completions", _force_logprobs), HookType.BEFORE)
    HookRegistry.register(f"{_STREAMER}.stream_output",
                          guarded("completions", lambda rt, sched, reqs, *a, **k:
                                  _log_finished(rt, reqs)), HookType.BEFORE)
    HookRegistry.register(f"{_STREAMER}.stream_output",
                          guarded("train", lambda rt, streamer, reqs, *a, **k:
                                  _note_first_tokens(rt, reqs)), HookType.BEFORE)

    def around_sleep(original: Any, sched: Any, *args: Any, **kwargs: Any) -> Any:
        rt = holder.runtime
        try:
            if rt is not None and rt.has_training_work():
                return None  # Note: the loop stays awake while the trainer has work
        except Exception as exc:
            logger.exception("idle-sleep hook failed")
            if rt is not None:
                rt.disable("train", f"{type(exc).__name__}: {exc}")
        return original(sched, *args, **kwargs)

    HookRegistry.register(f"{_SCHED}.maybe_sleep_on_idle", around_sleep, HookType.AROUND)


def _stamp(rt: Runtime, req: Any) -> None:
    """Note [Version stamp]."""
    kv = req.kv
    if kv.req_pool_idx is not None or kv.kv_allocated_len > 0:
        return
    if not hasattr(req, _BASE_KEY_ATTR):
        setattr(req, _BASE_KEY_ATTR, req.extra_key)
    version = rt.state.weight_version
    req.extra_key = f"wv={version}|" + (getattr(req, _BASE_KEY_ATTR) or "")
    setattr(req, _STAMP_ATTR, version)


def _is_opted_out(req: Any) -> bool:
    custom = getattr(req.sampling_params, "custom_params", None) or {}
    ours = custom.get("alchemist") if isinstance(custom, dict) else None
    return isinstance(ours, dict) and ours.get("store") is False


def _log_finished(rt: Runtime, reqs: Any) -> None:
    """Note [Completion log]: before SGLang sends a batch's outputs on, requests seen for the first
    time are logged as running (feedback on them answers 409) and finished ones are committed with
    their tokens, prefill version and untempered output log-probs: one transaction each per batch.
    Warm-up requests and opt-outs (``store: false``) are never logged. Radix hits are counted per
    publish window (loop.py, Note [Radix hit rate])."""
    from sglang.srt.utils.weight_versions import compute_weight_version_spans  # noqa: PLC0415

    now = time.time()
    started: list[str] = []
    finished: list[Any] = []
    for req in reqs:
        if getattr(req, "_alchemist_logged", False):
            continue
        params = req.sampling_params
        if int(getattr(params, "max_new_tokens", 1) or 0) == 0 or _is_opted_out(req):
            req._alchemist_logged = True  # warm-up, or never logged
            continue
        if not req.finished():
            if not getattr(req, "_alchemist_started", False):
                req._alchemist_started = True
                started.append(str(req.rid))
            continue
        req._alchemist_logged = True
        rt.note_finished_request(int(req.cached_tokens or 0), len(req.origin_input_ids))
        output = tuple(req.output_ids_through_stop)
        vals = getattr(getattr(req, "logprob", None), "output_token_logprobs_val", None)
        logprobs = tuple(float(v) for v in vals[:len(output)]) if vals and len(vals) >= len(output) else None
        reason = req.finished_reason.to_json() if req.finished_reason is not None else None
        spans = compute_weight_version_spans(req.weight_version_events,
                                             current_version=rt.state.weight_version,
                                             num_output_tokens=len(output))
        finished.append(CompletionEntry(
            rid=str(req.rid), choice_index=0, prompt_ids=tuple(req.origin_input_ids),
            output_ids=output, prefill_version=getattr(req, _STAMP_ATTR, None),
            weight_versions=tuple({"version": sp.version, "start": sp.start, "end": sp.end}
                                  for sp in spans),
            finish_reason=(reason or {}).get("type") if isinstance(reason, dict) else None,
            created_at=getattr(req, "_alchemist_started_at", now), finished_at=now,
            output_logprobs=logprobs))
    if rt.completions is None:
        return
    if started:
        rt.completions.mark_started(started)
    if finished:
        rt.completions.put_many(finished)


def _note_first_tokens(rt: Runtime, reqs: Any) -> None:
    """Note [Scheduler TTFT]: each request's first token, once, into ``rt.state.ttft``."""
    now = rt.clock()
    for req in reqs:
        ts = getattr(req, "time_stats", None)
        if ts is None or getattr(req, "_alchemist_ttft_seen", False):
            continue
        first, recv = float(ts.prefill_finished_time), float(ts.scheduler_recv_time)
        if first > 0.0 and recv > 0.0:
            req._alchemist_ttft_seen = True
            rt.state.ttft.add((first - recv) * 1000.0, now)


def _force_logprobs(rt: Runtime, sched: Any, recv_req: Any, *args: Any, **kwargs: Any) -> None:
    """The completion log keeps serving-time output log-probs; SGLang's tokenizer still returns
    them only to clients that asked (its own copy of the request says so). Also counts arrivals
    for the memory arbiter."""
    if int(getattr(getattr(recv_req, "sampling_params", None), "max_new_tokens", 1) or 0) == 0:
        return
    rt.state.arrivals += 1
    recv_req.return_logprob = True


def serving_pressure(sched: Any, state: RuntimeState) -> ServingPressure:
    """The arbiter's input from the scheduler: queue, running batch, KV free fraction counting the
    radix cache's evictable tokens as free (a full cache is not pressure), arrivals."""
    waiting = sched.waiting_queue
    running = sched.running_batch
    kv = kv_pool_view(sched, with_bytes=False)
    free = kv_free_fraction(kv.free_tokens, kv.evictable_tokens, kv.pool_tokens)
    return ServingPressure(
        waiting_requests=len(waiting), waiting_tokens=sum(len(r.origin_input_ids) for r in waiting),
        running_requests=0 if running is None or running.is_empty() else len(running.reqs),
        kv_free_fraction=free, arrivals=state.arrivals,
        recent_ttft_ms=state.ttft.value(time.monotonic()))


def kv_pool_view(sched: Any, *, with_bytes: bool = True) -> KvPoolView:
    """SGLang's token KV pool as plain numbers (memory/status.py ``KvPoolView``)."""
    allocator = sched.token_to_kv_pool_allocator
    pool_bytes = None
    if with_bytes:
        size = getattr(allocator.get_kvcache(), "get_kv_size_bytes", None)
        found = size() if size is not None else None
        pool_bytes = int(sum(found)) if isinstance(found, (tuple, list)) else (
            None if found is None else int(found))
    return KvPoolView(pool_tokens=int(sched.max_total_num_tokens),
                      free_tokens=int(allocator.available_size()),
                      evictable_tokens=int(sched.tree_cache.evictable_size()), pool_bytes=pool_bytes)


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat template's prompt ids with the generation prompt (transformers 5 returns a
    BatchEncoding by default; ask for the plain list)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    return [int(t) for t in ids]


class SchedulerHost:
    """``ServingHost`` over the scheduler: publish only with no chunked prefill in flight;
    announce a version on the scheduler side (``record_weight_version_change``) and to us."""

    def __init__(self, scheduler: Any, state: RuntimeState) -> None:
        self.scheduler, self.state = scheduler, state

    def can_publish(self) -> bool:
        return bool(self.scheduler.chunked_req is None)

    def announce(self, version: str) -> None:
        self.state.weight_version = version
        self.scheduler.record_weight_version_change(version)


def shared_storage(model: Any, weights: BaseWeights) -> dict[str, object]:
    """Whether every tensor the trainer reads (and the publisher writes) is the served model's own
    parameter storage: no second copy of the base (tests)."""
    served = {p.data_ptr(): tuple(p.shape) for p in model.parameters()}
    ours = [weights.embed, weights.final_norm, weights.lm_head]
    for lw in weights.layers:
        ours += [lw.qkv, lw.o, lw.gate_up, lw.down, lw.input_layernorm, lw.post_attention_layernorm]
    shared = sum(1 for t in ours if served.get(t.data_ptr()) == tuple(t.shape))
    return {"tensors": len(ours), "shared": shared, "is_shared": shared == len(ours)}


def served_model(scheduler: Any, config: Config, state: RuntimeState) -> ServedModel | None:
    """The served model as the composition root needs it for training (None: training is off).
    Raises ConfigError when a projection's weight was repacked for a CPU kernel."""
    if not config.train.is_enabled:
        logger.info("training is off (train.enabled=false)")
        return None
    model = scheduler.tp_worker.model_runner.model
    check_in_place_safe(model)
    weights = served_weights(model)
    tokenizer = scheduler.tokenizer
    inject = {int(s) for s in os.environ.get(NONFINITE_ENV, "").split(",") if s.strip()}
    return ServedModel(
        weights=weights, parameters=tuple(model.parameters()), host=SchedulerHost(scheduler, state),
        tokenize=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
        chat=lambda messages: _chat_ids(tokenizer, messages),
        eos_id=getattr(tokenizer, "eos_token_id", None),
        max_tokens=int(getattr(scheduler, "max_req_input_len", 0) or scheduler.model_config.context_len),
        pressure=lambda: serving_pressure(scheduler, state),
        kv_pool=lambda: kv_pool_view(scheduler), storage=lambda: shared_storage(model, weights),
        inject_nonfinite_steps=frozenset(inject))
