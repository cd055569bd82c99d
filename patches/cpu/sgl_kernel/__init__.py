"""CPU stand-in for the `sgl_kernel` package (pure PyTorch), for sglang==0.5.23 on CPU only.

Answers:
  * sglang/srt/mem_cache/allocation.py:46 (`from sgl_kernel import assign_req_to_token_pool_cpu`,
    called from `assign_req_to_token_pool_func`, line 745, on every extend).
  * sglang/kernels/ops/kvcache/cache_move.py:10 (`from sgl_kernel import copy_all_layer_kv_cache_cpu`,
    imported at module load, not called by the Llama path).
Why: with SGLANG_USE_CPU_ENGINE=1 SGLang imports CPU kernels from `sgl_kernel` at module load, and
PyPI only ships CUDA builds of sgl-kernel (`sglang-kernel`). `torch.ops.sgl_kernel` stays undefined,
so every layer takes its `forward_native` branch.
Retire when: a CPU wheel of sglang-kernel matching sglang 0.5.23 is published on PyPI.

Every name not implemented here resolves to a callable that raises `NotImplementedError` naming
itself, so a code path we do not support fails loudly, never silently.
"""

from __future__ import annotations

import torch

__version__ = "0.0.0+alchemist-cpu-stand-in"
IS_ALCHEMIST_STAND_IN = True


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,  # [B] int
    req_to_token: torch.Tensor,  # [pool_size, max_context_len] int32
    start_offset: torch.Tensor,  # [B] int
    end_offset: torch.Tensor,  # [B] int
    out_cache_loc: torch.Tensor,  # [sum(end - start)] int
    max_context_len: int,
) -> None:
    """For request i, writes out_cache_loc[cum_i : cum_i + end_i - start_i] into
    req_to_token[req_pool_indices[i], start_i:end_i], where cum_i sums the earlier lengths."""
    del max_context_len  # the row width is req_to_token.shape[1]
    # Host syncs: these index tensors live on the CPU already (CPU engine only).
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    cursor = 0
    for row, start, end in zip(rows, starts, ends):
        length = end - start
        if length <= 0:
            continue
        req_to_token[row, start:end] = out_cache_loc[cursor : cursor + length].to(req_to_token.dtype)
        cursor += length


class _Unimplemented:
    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError(
            f"sgl_kernel.{self._name} is not provided by alchemist-sgl's CPU stand-in "
            f"(patches/cpu/sgl_kernel); only assign_req_to_token_pool_cpu is implemented"
        )

    def __repr__(self) -> str:
        return f"<unimplemented sgl_kernel.{self._name}>"


def __getattr__(name: str) -> object:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Unimplemented(name)
