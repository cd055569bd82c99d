"""The sglang side of recording: module forward hooks on the base projections of SGLang's Llama.

Owns turning SGLang's objects (``ScheduleBatch``, ``ForwardBatch``, projection modules) into the
pure ``Capture`` protocol (record/capture.py). ``install(scheduler, config, state)`` is called
once in the scheduler process after ``Scheduler.__init__`` (by integration/plugin.py), before the
composition root (runtime.py) is built over what it returns.

What it touches (listed for the hook-point manifest in ``SGLANG_NAMES`` and
``SGLANG_INSTANCE_ATTRIBUTES``):
  * ``Scheduler.run_batch`` is wrapped ON THE INSTANCE (not the class) to see the ``ScheduleBatch``
    whose forward is about to run: ``batch.reqs[i].rid``, ``.origin_input_ids``, ``.lora_id``,
    ``.sampling_params.custom_params``.
  * A forward pre-hook / hook on ``LlamaForCausalLM.model`` (``LlamaModel``, called through
    ``nn.Module.__call__``; the runner calls ``LlamaForCausalLM.forward`` directly, so hooks on the
    top module would never fire) reads the ``ForwardBatch``: ``forward_mode.is_extend()`` (true for
    MIXED too), ``rids``, ``extend_prefix_lens_cpu``, ``extend_seq_lens_cpu``. A request's rows are
    consecutive in batch order (the CPU-side equivalent of ``extend_start_loc``).
  * Forward hooks on ``model.layers[i].self_attn.qkv_proj``, ``.self_attn.o_proj``,
    ``.mlp.gate_up_proj``, ``.mlp.down_proj``: output ``(tensor [rows, width], bias)``.
  * For ``record.plan: graph`` also integration/graph_capture.py's names (Note [Graph capture]):
    torch_native's module-global SDPA is swapped for a tap, and o_proj gets a forward pre-hook.

Note [Which rows are recorded]: only extend forwards; within one, each request's rows for positions
``[prefix_len, prefix_len + extend_len)`` clipped to its prompt (decode rows of a MIXED batch sit at
or past the prompt's end and are dropped); only requests with ``custom_params.alchemist.record``
and ``.store`` not false. Chunked prefill joins up in the store (its Note [Page alignment]).

Note [Prefill must run eagerly]: on CUDA, SGLang 0.5.23 replays prefill in a CUDA graph by default
(``cuda_graph_config.prefill.backend`` "breakable"), and decode always; a graph replay runs no
Python, so no forward hook fires. Decode is never recorded, so its graphs are harmless. Prefill
graphs are refused at startup while recording is on (integration/environment.py,
``check_recording_flags``), and two checks catch what the startup check cannot foresee: the
``run_batch`` wrapper counts the model pre-hook's extend forwards, and a prefill batch
(EXTEND / MIXED, not speculative TARGET_VERIFY, which runs in decode graphs and records nothing)
that ran without one disables recording loudly (``Capture.on_prefill_without_hooks``); within a
forward that did reach the hooks, ``Capture.end`` requires every planned output (record/capture.py,
Note [Every planned output, once]).

Note [LoRA-wrapped projections]: with ``--enable-lora`` SGLang wraps each projection; the wrapper
computes the base output inside and adds the adapter's delta, and never calls the base module
through ``__call__``. We then hook the wrapper and record only requests served without an adapter,
whose rows carry the pure base output; adapter requests are not recorded (a known gap).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from alchemist_sgl.config import Config
from alchemist_sgl.log import get_logger
from alchemist_sgl.core.prefix import Namespace
from alchemist_sgl.record.capture import Capture
from alchemist_sgl.record.plan_choice import plan_for
from alchemist_sgl.core.plan import TENSOR_ORDER, ModelShape, RecordPlan
from alchemist_sgl.core.plan_auto import PlanChoice
from alchemist_sgl.core.records import RequestExtend
from alchemist_sgl.integration import graph_capture
from alchemist_sgl.integration.graph_capture import graph_refusal, install_graph_hooks
from alchemist_sgl.runtime import RuntimeState
from alchemist_sgl.store import ActivationStore

logger = get_logger(__name__)

# Tests only (Capture's ``fault_after_forwards``, ``dump_dir`` and ``staging=True``).
FAULT_ENV = "ALCHEMIST_SGL_INJECT_RECORD_FAULT_AFTER"
DUMP_ENV = "ALCHEMIST_SGL_RECORD_DUMP_DIR"
STAGING_ENV = "ALCHEMIST_SGL_RECORD_FORCE_STAGING"

# For the hook-point manifest. Resolvable with pkgutil.resolve_name:
SGLANG_NAMES = (
    "sglang.srt.managers.scheduler.Scheduler.run_batch",
    "sglang.srt.managers.tp_worker.TpModelWorker.model_runner",
    "sglang.srt.models.llama.LlamaForCausalLM",
    "sglang.srt.models.llama.LlamaModel.forward",
    "sglang.srt.models.llama.LlamaAttention.forward_prepare_native",
    "sglang.srt.models.llama.LlamaMLP.forward",
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.rids",
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.extend_prefix_lens_cpu",
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.extend_seq_lens_cpu",
    "sglang.srt.model_executor.forward_batch_info.ForwardMode.is_extend",
    "sglang.srt.model_executor.forward_batch_info.ForwardMode.is_target_verify",
    "sglang.srt.managers.schedule_batch.ScheduleBatch.forward_mode",
    # integration/environment.py, check_recording_flags (Note [Eager prefill for recording]):
    "sglang.srt.model_executor.cuda_graph_config.default_prefill_backend",
    "sglang.srt.model_executor.cuda_graph_config.Backend.DISABLED",
    "sglang.srt.model_executor.cuda_graph_config.Backend.BREAKABLE",
    "sglang.srt.sampling.sampling_params.SamplingParams.custom_params",
    *graph_capture.SGLANG_NAMES,  # record.plan graph (integration/graph_capture.py)
)
# Set on instances (``self.x = ...`` in __init__) or dataclass fields without a default:
SGLANG_INSTANCE_ATTRIBUTES = (
    "sglang.srt.managers.scheduler.Scheduler.tp_worker",
    "sglang.srt.managers.scheduler.Scheduler.page_size",
    "sglang.srt.managers.scheduler.Scheduler.max_total_num_tokens",
    "sglang.srt.model_executor.model_runner.ModelRunner.model",
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.forward_mode",
    "sglang.srt.managers.schedule_batch.ScheduleBatch.reqs",
    "sglang.srt.managers.schedule_batch.Req.rid",
    "sglang.srt.managers.schedule_batch.Req.origin_input_ids",
    "sglang.srt.managers.schedule_batch.Req.lora_id",
    "sglang.srt.managers.schedule_batch.Req.sampling_params",
    *graph_capture.SGLANG_INSTANCE_ATTRIBUTES,
)
_PROJECTIONS = {"qkv": ("self_attn", "qkv_proj"), "o": ("self_attn", "o_proj"),
                "gate_up": ("mlp", "gate_up_proj"), "down": ("mlp", "down_proj")}
_INSTALLED_ATTR = "_alchemist_recording"  # install() is idempotent per scheduler
_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


class RecordingHooks:
    """The installed hooks and the components they feed; ``remove()`` takes them all out."""

    def __init__(self, capture: Capture, store: ActivationStore, choice: PlanChoice,
                 handles: list[Any], restore: Callable[[], None]) -> None:
        self.capture, self.store, self.choice = capture, store, choice
        self._handles, self._restore = handles, restore

    @property
    def plan(self) -> RecordPlan:
        return self.choice.plan

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._restore()


def install(scheduler: Any, config: Config, state: RuntimeState) -> RecordingHooks | None:
    """Builds plan, store and capture for ``scheduler``'s model and hooks them in (once).

    ``state``: the runtime's shared state (the serving version namespaces recordings; a failure
    disables ``record`` there). Returns None (and says why in the log and status) when recording
    is off or the model is not supported.
    """
    existing: RecordingHooks | None = scheduler.__dict__.get(_INSTALLED_ATTR)
    if existing is not None:
        return existing
    if not config.record.is_enabled:
        logger.info("recording is off (record.enabled=false)")
        return None
    model = scheduler.tp_worker.model_runner.model
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or type(model).__name__ not in {"LlamaForCausalLM"}:
        state.disable("record", f"recording supports LlamaForCausalLM, not {type(model).__name__}")
        return None
    weight = next(model.parameters())
    if weight.dtype not in _DTYPE_BYTES:
        state.disable("record", f"unsupported model dtype {weight.dtype}")
        return None
    shape = ModelShape.from_hf_config(model.config, _DTYPE_BYTES[weight.dtype])
    wrapped = {name for name in TENSOR_ORDER if hasattr(_projection(layers[0], name), "base_layer")}
    refusal = _graph_refusal(scheduler, weight, bool(wrapped))
    choice = plan_for(config, shape, {"graph": refusal} if refusal is not None else None)
    plan = choice.plan
    logger.info("record plan %s (%s)", list(plan.tensors), choice.rule)
    wrapped_lora = any(name in wrapped for name in plan.projections)
    if plan.is_graph and refusal is not None:
        state.disable("record", refusal)
        return None
    sglang_page = int(getattr(scheduler, "page_size", 1) or 1)
    if sglang_page % plan.page_tokens != 0:
        logger.warning("SGLang page size %d is not a multiple of store.page_tokens %d: radix hits "
                       "can end mid-page and those rows are skipped (Note [Page alignment])",
                       sglang_page, plan.page_tokens)
    store = ActivationStore(plan, host_bytes=config.store.host_bytes,
                            device_bytes=config.store.device_bytes, dtype=weight.dtype,
                            device=weight.device, ttl_s=config.store.ttl_s,
                            dedup=config.store.dedup)
    if not config.store.dedup and not any(config.sglang.get(k) for k in ("disable-radix-cache",
                                                                        "disable_radix_cache")):
        logger.warning("store.dedup is false with the radix cache on: a prefix the radix cache "
                       "serves is a hole in each request's own recording (recomputed in training)")
    fault = os.environ.get(FAULT_ENV)
    capture = Capture(store, plan, on_failure=lambda reason: state.disable("record", reason),
                      staging=True if os.environ.get(STAGING_ENV) == "1" else None,
                      fault_after_forwards=int(fault) if fault else None,
                      dump_dir=os.environ.get(DUMP_ENV) or None)
    view = _BatchViewBuilder(capture, lambda: str(state.weight_version), wrapped_lora)

    handles, restore_graph = _hook_model(capture, view, inner, layers, plan)
    original_run_batch = scheduler.run_batch

    def run_batch(batch: Any, *args: Any, **kwargs: Any) -> Any:
        view.set_schedule_batch(batch)
        seen = view.extend_forwards
        try:
            result = original_run_batch(batch, *args, **kwargs)
        finally:
            view.set_schedule_batch(None)
        view.check_prefill_reached_hooks(batch, seen)  # Note [Prefill must run eagerly]
        return result

    scheduler.run_batch = run_batch  # instance attribute: shadows Scheduler.run_batch
    _check_lifetime_against_radix(scheduler, store, plan)
    logger.info("recording %s per layer of %d layers: %d bytes/token, host pool %d pages",
                list(plan.tensors), shape.layers, plan.bytes_per_token,
                store.status()["host_capacity_bytes"] // max(plan.slot_bytes, 1))
    def restore() -> None:
        restore_graph()
        scheduler.__dict__.pop("run_batch", None)
        scheduler.__dict__.pop(_INSTALLED_ATTR, None)

    hooks = RecordingHooks(capture, store, choice, handles, restore)
    setattr(scheduler, _INSTALLED_ATTR, hooks)
    return hooks


def _graph_refusal(scheduler: Any, weight: torch.Tensor, is_lora_wrapped: bool) -> str | None:
    if is_lora_wrapped:
        return "record.plan graph cannot record LoRA-wrapped projections"
    return graph_refusal(scheduler, weight)


def _hook_model(capture: Capture, view: _BatchViewBuilder, inner: Any, layers: Any,
                plan: RecordPlan) -> tuple[list[Any], Callable[[], None]]:
    """The model's and the projections' hooks (and the graph plan's); (handles, restore)."""
    handles = [inner.register_forward_pre_hook(view.pre_forward, with_kwargs=True),
               inner.register_forward_hook(view.post_forward)]
    for layer_index, layer in enumerate(layers):
        for name in plan.projections:
            handles.append(_projection(layer, name).register_forward_hook(
                _output_hook(capture, name, layer_index)))
    if not plan.is_graph:
        return handles, lambda: None
    graph_handles, restore = install_graph_hooks(capture, inner, layers)  # Note [Graph capture]
    return handles + graph_handles, restore


def _check_lifetime_against_radix(scheduler: Any, store: ActivationStore, plan: RecordPlan) -> None:
    """Note [Store outlives the radix cache]: a prefix cached by SGLang is never prefilled again,
    so if its pages were evicted first they stay holes for as long as the radix cache keeps it.
    The store does not follow the radix cache's evictions; it avoids the holes by capacity: when
    the host pool holds at least as many tokens as SGLang's KV pool, every token the radix cache
    can hold fits. When it cannot, say so at startup (and recomputation covers the holes)."""
    kv_tokens = int(getattr(scheduler, "max_total_num_tokens", 0) or 0)
    store_tokens = store.status()["host_capacity_bytes"] // max(plan.bytes_per_token, 1)
    if kv_tokens and store_tokens < kv_tokens:
        logger.warning("the activation store holds %d tokens, fewer than SGLang's KV pool (%d): "
                       "prefixes the radix cache keeps may lose their recordings first and be "
                       "recomputed in training; raise store.host_bytes to at least %d",
                       store_tokens, kv_tokens, kv_tokens * plan.bytes_per_token)


def _projection(layer: torch.nn.Module, name: str) -> torch.nn.Module:
    block, attr = _PROJECTIONS[name]
    return getattr(getattr(layer, block), attr)


def _output_hook(capture: Capture, name: str, layer: int) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if not capture.is_recording:
            return
        capture.on_output(name, layer, output[0] if isinstance(output, tuple) else output)

    return hook


class _BatchViewBuilder:
    """Turns (ScheduleBatch, ForwardBatch) into RequestExtend views and drives Capture."""

    def __init__(self, capture: Capture, base_version: Callable[[], str],
                 is_lora_wrapped: bool) -> None:
        self._capture = capture
        self._base_version = base_version
        self._is_lora_wrapped = is_lora_wrapped
        self._reqs: dict[str, Any] = {}
        self.extend_forwards = 0  # extend forwards the model pre-hook saw

    def set_schedule_batch(self, batch: Any) -> None:
        self._reqs = {req.rid: req for req in batch.reqs} if batch is not None else {}

    def pre_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            forward_batch = kwargs.get("forward_batch", args[2] if len(args) > 2 else None)
            if forward_batch is None or not forward_batch.forward_mode.is_extend():
                return None
            self.extend_forwards += 1
            extends = self._extends(forward_batch)
        except Exception as exc:  # Note [Never raise into serving] in record/capture.py
            self._capture._fail("reading the batch", exc)
            return None
        if extends:
            self._capture.begin(extends)
        return None

    def post_forward(self, module: Any, args: Any, output: Any) -> None:
        self._capture.end()

    def check_prefill_reached_hooks(self, schedule_batch: Any, extend_forwards_before: int) -> None:
        """After ``run_batch``: a prefill batch whose forward never reached the model pre-hook ran
        without our hooks (Note [Prefill must run eagerly]); recording is disabled loudly."""
        try:
            mode = getattr(schedule_batch, "forward_mode", None)
            if mode is None or not mode.is_extend() or mode.is_target_verify():
                return
            if self.extend_forwards == extend_forwards_before:
                self._capture.on_prefill_without_hooks(
                    f"a prefill batch ({mode}) of {len(schedule_batch.reqs)} requests ran")
        except Exception as exc:  # Note [Never raise into serving] in record/capture.py
            self._capture._fail("checking the prefill", exc)

    def _extends(self, forward_batch: Any) -> list[RequestExtend]:
        rids = forward_batch.rids
        prefix_lens = forward_batch.extend_prefix_lens_cpu
        seq_lens = forward_batch.extend_seq_lens_cpu
        if rids is None or prefix_lens is None or seq_lens is None:
            return []
        base = self._base_version()
        extends, row = [], 0
        for rid, prefix_len, extend_len in zip(rids, prefix_lens, seq_lens):
            req = self._reqs.get(rid)
            if req is not None:
                lora_id = getattr(req, "lora_id", None)
                params = getattr(req.sampling_params, "custom_params", None) or {}
                ours = params.get("alchemist") if isinstance(params, dict) else None
                ours = ours if isinstance(ours, dict) else {}
                is_recording = (ours.get("record", True) is not False
                                and ours.get("store", True) is not False
                                and not (self._is_lora_wrapped and lora_id is not None))
                extends.append(RequestExtend(
                    rid, Namespace(base, lora_id), req.origin_input_ids, int(prefix_len),
                    int(extend_len), row, is_recording))
            row += int(extend_len)
        return extends
