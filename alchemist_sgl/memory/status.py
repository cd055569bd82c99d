"""The ``/alchemist/status.memory`` block: what the served model, the trainer and the KV pool hold.

Owns ``KvPoolView`` (SGLang's KV pool as plain numbers, built in ``integration/``),
``storage_bytes`` and ``memory_status``. Imports torch and package value types only; never sglang.

Note [Memory account, read not estimated]: every number is read from live objects when status is
asked: tensor parts are the ``nbytes`` of the DISTINCT storages (by ``data_ptr``) of the tensors
handed in (a tied embedding counts once); saved tensors come from the ``ResidencyAccount`` of
``memory.offload`` (train/residency.py, Note [Logical device pool]); KV tokens from SGLang's
allocator and radix cache, KV bytes from the pool's own ``get_kv_size_bytes``. No formula over
shapes or configs. ``measurement`` is ``"cuda"`` when the weights live on CUDA (the allocator's
totals are added under ``cuda``) and ``"logical-cpu"`` otherwise: on CPU the "device" is the
logical pool the account runs, the bytes are real storages either way.
Not covered: the publisher's staging buffers and the gate's snapshot of the accepted adapter
(held privately by their owners), the store's recordings (the ``store`` block has them), and
autograd workspace that is not a saved tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch


@dataclass(frozen=True)
class KvPoolView:
    """SGLang's token KV pool at one moment (integration/training.py reads it)."""

    pool_tokens: int       # the pool's size (scheduler.max_total_num_tokens)
    free_tokens: int       # allocator.available_size(): held by nobody
    evictable_tokens: int  # tree_cache.evictable_size(): cached, unreferenced, reclaimable
    pool_bytes: int | None = None  # the KV cache tensors' bytes (None: the pool cannot say)

    @property
    def used_tokens(self) -> int:
        """Tokens held by requests (or locked radix nodes): neither free nor evictable."""
        return max(0, self.pool_tokens - self.free_tokens - self.evictable_tokens)

    def status(self) -> dict[str, Any]:
        available = self.free_tokens + self.evictable_tokens
        return {"pool_tokens": self.pool_tokens, "used_tokens": self.used_tokens,
                "free_tokens": self.free_tokens, "evictable_tokens": self.evictable_tokens,
                "available_fraction": (min(1.0, available / self.pool_tokens)
                                       if self.pool_tokens > 0 else 1.0),
                "pool_bytes": self.pool_bytes}


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages under ``tensors`` (Note [Memory account, read not
    estimated]); None entries and empty storages count nothing."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


def memory_status(*, device: torch.device | str, served: Iterable[torch.Tensor], master: Any,
                  trainer: Any, kv: KvPoolView | None) -> dict[str, Any]:
    """The ``memory`` block. ``served``: the served model's parameters; ``master``: a
    ``MasterWeights`` (its ``tensors[layer][projection]``); ``trainer``: a ``ReplayTrainer``
    (adapter, optimizer, published adapter, ``residency`` = the ``SavedTensorOffload`` of
    ``memory.offload`` or None); ``kv``: None when no KV pool is readable."""
    device = torch.device(device)
    params = list(trainer.adapter.parameters())
    published = getattr(trainer, "published", None)
    offload = getattr(trainer, "residency", None)
    out: dict[str, Any] = {
        "measurement": "cuda" if device.type == "cuda" else "logical-cpu",
        "weights_bytes": storage_bytes(served),
        "master_bytes": storage_bytes(t for layer in master.tensors for t in layer.values()),
        "adapter_bytes": storage_bytes(params),
        "gradient_bytes": storage_bytes(p.grad for p in params),
        "optimizer_bytes": storage_bytes(_optimizer_tensors(trainer.optimizer)),
        "published_adapter_bytes": (0 if published is None else storage_bytes(
            [*published.a.values(), *published.b.values()])),
        # memory.offload off: no account runs (the saved tensors are autograd's alone).
        "saved_tensors": None if offload is None else offload.status(),
        "kv": None if kv is None else kv.status(),
    }
    if device.type == "cuda":
        out["cuda"] = {"allocated_bytes": torch.cuda.memory_allocated(device),
                       "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                       "reserved_bytes": torch.cuda.memory_reserved(device)}
    return out
