"""The sglang side of the ``graph`` record plan: the attention output and its per-head lse.

Owns ``graph_refusal`` (why a server cannot record the graph plan, or None), ``LseTap`` (the
stand-in for torch_native's SDPA that also keeps the log-sum-exp) and ``install_graph_hooks``
(the tap and one forward pre-hook per layer's ``self_attn.o_proj``). integration/capture_hooks.py
calls it for a graph plan (core/plan.py, Note [Graph plan]); the projections are recorded there as
for any plan. Imports no sglang at import time.

Note [Graph capture]: on CPU with ``attention-backend: torch_native`` SGLang's prefill attention
is ``TorchNativeAttnBackend._run_sdpa_forward_extend``: per sequence in batch order, a padded query
of the sequence's whole length (rows [prefix, prefix + extend) filled, the rest uninitialised),
that sequence's keys and values read from the KV cache, and the module global
``scaled_dot_product_attention`` (torch's SDPA), keeping rows [prefix:]. ``LseTap`` replaces that
global. While a forward is being recorded it calls the kernel SDPA itself dispatches to on CPU
for these inputs, ``aten._scaled_dot_product_flash_attention_for_cpu``, which also returns the
natural log-sum-exp of the scaled causal scores, [heads, seq] fp32; the output is the same
(checked against SDPA in tests/unit/test_record_graph_capture.py on the backend's padded,
strided inputs). When SDPA would choose another kernel (a mask, dropout) it calls SDPA and keeps
nothing. The o_proj pre-hook of the same layer (it runs right after attention) hands its input
to ``Capture.on_output("attn", ...)`` and drains the tap: one lse per sequence of the forward,
whose last extend_len columns are that sequence's new rows, in batch order, as [rows, heads]
fp32, bit-cast to the model dtype for the store. A missing lse (another kernel ran) leaves the
forward one output short, which ``Capture.end`` refuses loudly (record/capture.py, Note [Every
planned output, once]). Decode forwards are never recorded, so the tap passes them through.

The trainer rebuilds the rest of the graph from these rows with its own ops
(train/graph_rows.py), which mirror SGLang's CPU path only without AMX kernels, with RoPE's
cache in the model dtype and at TP 1; ``graph_refusal`` refuses anything else.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from alchemist_sgl.record.capture import Capture

_BACKEND_MODULE = "sglang.srt.layers.attention.torch_native_backend"
# For the hook-point manifest (integration/manifest.py reads capture_hooks', which include these):
SGLANG_NAMES = (
    f"{_BACKEND_MODULE}.scaled_dot_product_attention",
    f"{_BACKEND_MODULE}.TorchNativeAttnBackend",
    f"{_BACKEND_MODULE}.TorchNativeAttnBackend._run_sdpa_forward_extend",
    "sglang.srt.models.llama.LlamaAttention.forward",
    "sglang.srt.utils.common.cpu_has_amx_support",
)
SGLANG_INSTANCE_ATTRIBUTES = (
    "sglang.srt.model_executor.model_runner.ModelRunner.attn_backend",
    "sglang.srt.managers.scheduler.Scheduler.tp_size",
)
_FLASH = 1  # torch._fused_sdp_choice's value for SDPBackend.FLASH_ATTENTION


def graph_refusal(scheduler: Any, weight: torch.Tensor) -> str | None:
    """Why this server cannot record the graph plan (Note [Graph capture]), or None."""
    from sglang.srt.utils.common import cpu_has_amx_support  # noqa: PLC0415

    backend = type(getattr(scheduler.tp_worker.model_runner, "attn_backend", None)).__name__
    if weight.device.type != "cpu":
        return f"record.plan graph records on CPU only, not {weight.device.type}"
    if backend != "TorchNativeAttnBackend":
        return f"record.plan graph needs attention-backend torch_native, not {backend}"
    if cpu_has_amx_support():
        return "record.plan graph: SGLang's AMX CPU kernels round differently from the trainer"
    if os.environ.get("SGLANG_ROPE_CACHE_FP32", "").lower() in ("1", "true"):
        return "record.plan graph: SGLANG_ROPE_CACHE_FP32 rounds RoPE differently from the trainer"
    if int(getattr(scheduler, "tp_size", 1) or 1) != 1:
        return "record.plan graph records at tensor-parallel size 1 only"
    return None


class LseTap:
    """torch's SDPA with the log-sum-exp kept while ``capture`` records (Note [Graph capture])."""

    def __init__(self, capture: Capture, original: Callable[..., torch.Tensor]) -> None:
        self.capture, self.original = capture, original
        self.pending: list[torch.Tensor] = []  # [heads, seq] fp32 per sequence, batch order
        self.seq_lens: list[int] = []  # the recorded forward's extend lengths, batch order

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                 is_causal: bool = False, scale: float | None = None,
                 enable_gqa: bool = False) -> torch.Tensor:
        if (self.capture.is_recording and attn_mask is None and dropout_p == 0.0
                and query.dim() == 4 and query.shape[0] == 1
                and torch._fused_sdp_choice(query, key, value, is_causal=is_causal, scale=scale,
                                            enable_gqa=enable_gqa) == _FLASH):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, 0.0, is_causal, scale=scale)
            self.pending.append(lse[0])
            return out
        return self.original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                             is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    def drain_rows(self) -> torch.Tensor | None:
        """The pending lse as [rows, heads] fp32 (each sequence's last extend_len columns, batch
        order), or None when they do not match the forward's sequences; empties the list."""
        pending, self.pending = self.pending, []
        if len(pending) != len(self.seq_lens):
            return None
        parts = [lse[:, lse.shape[1] - n:].t() for lse, n in zip(pending, self.seq_lens)]
        return torch.cat(parts).contiguous()


def install_graph_hooks(capture: Capture, inner: Any, layers: Any) -> tuple[list[Any], Callable[[], None]]:
    """The tap (a swap of the backend's module global) and the hooks; (handles, restore)."""
    import importlib  # noqa: PLC0415

    backend: Any = importlib.import_module(_BACKEND_MODULE)
    tap = LseTap(capture, backend.scaled_dot_product_attention)
    backend.scaled_dot_product_attention = tap

    def restore() -> None:
        backend.scaled_dot_product_attention = tap.original

    def pre_forward(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tap.pending = []
        try:
            batch = kwargs.get("forward_batch", args[2] if len(args) > 2 else None)
            is_extend = batch is not None and batch.forward_mode.is_extend()
            lens = batch.extend_seq_lens_cpu if is_extend and batch is not None else None
            tap.seq_lens = [int(n) for n in lens] if lens is not None else []
        except Exception as exc:  # Note [Never raise into serving] in record/capture.py
            capture._fail("reading the batch for the graph plan", exc)

    handles = [inner.register_forward_pre_hook(pre_forward, with_kwargs=True)]
    for index, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            _attn_hook(capture, tap, index)))
    return handles, restore


def _attn_hook(capture: Capture, tap: LseTap, layer: int) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not capture.is_recording:
            tap.pending = []
            return
        try:
            attn = args[0]
            capture.on_output("attn", layer, attn)
            rows = tap.drain_rows()
            if rows is not None and rows.shape[0] == attn.shape[0]:
                capture.on_output("lse", layer, rows.view(attn.dtype))
        except Exception as exc:  # Note [Never raise into serving] in record/capture.py
            capture._fail(f"graph capture layer {layer}", exc)

    return hook
