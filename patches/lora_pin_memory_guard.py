"""Guard for LoRA's unconditional host-memory pinning, for sglang==0.5.23 on CPU only.

Answers: sglang/srt/lora/layers.py lines 145, 324, 479, 723, 814 (`torch.tensor(..., pin_memory=True)`)
and line 594 (`self.output_offset.cpu().pin_memory()` in
`MergedColumnParallelLinearWithLoRA.set_lora_info`).
Why: pinning host memory needs an accelerator; on a CPU-only torch both calls raise, so
`--enable-lora` cannot start. Without an accelerator pinning has no meaning, so the guard makes it a
no-op: `sglang.srt.lora.layers.torch` becomes a view of torch whose `tensor()` drops
`pin_memory=True`, and `Tensor.pin_memory()` returns the tensor itself while no accelerator exists.
Retire when: SGLang guards these calls with `is_pin_memory_available()` (not in 0.5.23).

`apply()` is idempotent and does nothing when an accelerator is available.
"""

from __future__ import annotations

import types

import torch

_APPLIED = False


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


class _TorchWithoutPinning(types.ModuleType):
    """Delegates to torch; `tensor(..., pin_memory=True)` drops the pin flag."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)

    @staticmethod
    def tensor(*args: object, **kwargs: object) -> torch.Tensor:
        kwargs.pop("pin_memory", None)
        return torch.tensor(*args, **kwargs)


def apply() -> bool:
    """Installs the guard; returns True when it is active (CPU-only process)."""
    global _APPLIED
    if _has_accelerator():
        return False
    if _APPLIED:
        return True
    import sglang.srt.lora.layers as lora_layers  # noqa: PLC0415 (imported on demand, CPU only)

    lora_layers.torch = _TorchWithoutPinning()
    original_pin = torch.Tensor.pin_memory

    def pin_memory_without_accelerator(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if _has_accelerator():
            return original_pin(self, *args, **kwargs)
        return self

    torch.Tensor.pin_memory = pin_memory_without_accelerator  # type: ignore[method-assign]
    _APPLIED = True
    return True
