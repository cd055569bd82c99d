"""The memory account of training: what is resident in the device pool and in the host pool.

Owns ``ResidencyAccount`` (bytes per pool read from the live storages it is handed, with peaks and
an optional device limit), ``HostPool`` (reused host buffers: pinned on CUDA) and
``DeviceBudgetExceeded``. Imports only torch. What moves tensors between the pools is offload.py;
this module only counts and hands out host buffers.

Note [Logical device pool]: on CUDA the device pool is the CUDA caching allocator's memory and the
host pool is pinned CPU memory; ``status()`` then also reports ``torch.cuda.memory_allocated`` and
its peak (``measurement == "cuda"``). On CPU both pools are CPU memory, so the device pool is
LOGICAL (``measurement == "logical-cpu"``), but it is run through the same code: a tensor that is
offloaded is really copied into a separate host buffer and the device storage is really dropped;
a reload copies into a fresh storage. Either way the account never estimates by formula: a pool's
resident bytes are the ``nbytes`` of the distinct storages (by ``data_ptr``) that are currently
registered in it, and a storage registered twice (two saved tensors of one storage, or a layer
output kept as a boundary and saved by a layer) is counted once. The account sees only what it is
handed: a storage that something else keeps alive after the account has let go of it is memory
the account no longer counts (offload.py only moves storages nothing else it tracks holds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Pool = Literal["device", "host"]
POOLS: tuple[Pool, ...] = ("device", "host")


class DeviceBudgetExceeded(RuntimeError):
    """Registering a storage would take the device pool past ``device_limit_bytes``."""

    def __init__(self, resident_bytes: int, adding_bytes: int, limit_bytes: int) -> None:
        self.resident_bytes, self.adding_bytes, self.limit_bytes = (resident_bytes, adding_bytes,
                                                                     limit_bytes)
        super().__init__(f"training device pool: {resident_bytes} resident + {adding_bytes} new "
                         f"bytes exceed the limit of {limit_bytes} bytes")


@dataclass
class _PoolState:
    storages: dict[int, list[int]] = field(default_factory=dict)  # data_ptr -> [nbytes, refs]
    resident_bytes: int = 0
    peak_bytes: int = 0


def storage_key(storage: torch.UntypedStorage) -> tuple[int, int]:
    """(data_ptr, nbytes) of a storage: its identity while something holds it."""
    return storage.data_ptr(), storage.nbytes()


class ResidencyAccount:
    """Bytes resident per pool ("device", "host"), from the storages registered there.

    Contract: every ``add(pool, storage)`` is matched by one ``remove(pool, storage)`` while the
    caller still holds the storage (so its ``data_ptr`` cannot be reused meanwhile). A storage
    added n times counts once and leaves the pool at the n-th remove. ``device_limit_bytes``: an
    ``add`` to the device pool that would exceed it raises ``DeviceBudgetExceeded`` and registers
    nothing. Not thread-safe: the scheduler thread owns it.
    """

    def __init__(self, device: torch.device | str, *, device_limit_bytes: int | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # tensors say cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        if device_limit_bytes is not None and device_limit_bytes <= 0:
            raise ValueError(f"device_limit_bytes must be positive (got {device_limit_bytes})")
        self.device_limit_bytes = device_limit_bytes
        self.is_cuda = self.device.type == "cuda"
        self.measurement = "cuda" if self.is_cuda else "logical-cpu"
        self._pools = {p: _PoolState() for p in POOLS}
        self.moved_to_host_bytes = 0    # cumulative bytes copied device -> host (offloads)
        self.moved_to_device_bytes = 0  # cumulative bytes copied host -> device (reloads)

    def add(self, pool: Pool, storage: torch.UntypedStorage) -> None:
        """Registers one more holder of ``storage`` in ``pool`` (empty storages are ignored)."""
        ptr, nbytes = storage_key(storage)
        if nbytes == 0:
            return
        state = self._pools[pool]
        entry = state.storages.get(ptr)
        if entry is not None:
            entry[1] += 1
            return
        limit = self.device_limit_bytes if pool == "device" else None
        if limit is not None and state.resident_bytes + nbytes > limit:
            raise DeviceBudgetExceeded(state.resident_bytes, nbytes, limit)
        state.storages[ptr] = [nbytes, 1]
        state.resident_bytes += nbytes
        state.peak_bytes = max(state.peak_bytes, state.resident_bytes)

    def remove(self, pool: Pool, storage: torch.UntypedStorage) -> None:
        """Drops one holder of ``storage`` from ``pool``; KeyError if it was never added."""
        ptr, nbytes = storage_key(storage)
        if nbytes == 0:
            return
        state = self._pools[pool]
        entry = state.storages[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            del state.storages[ptr]
            state.resident_bytes -= entry[0]

    def holders(self, pool: Pool, storage: torch.UntypedStorage) -> int:
        """How many registrations of ``storage`` ``pool`` holds now (0: none)."""
        entry = self._pools[pool].storages.get(storage.data_ptr())
        return 0 if entry is None else entry[1]

    def resident_bytes(self, pool: Pool) -> int:
        """Bytes of the distinct storages registered in ``pool`` now."""
        return self._pools[pool].resident_bytes

    def peak_bytes(self, pool: Pool) -> int:
        """The largest ``resident_bytes(pool)`` since construction or ``reset_peaks``."""
        return self._pools[pool].peak_bytes

    def reset_peaks(self) -> None:
        """Peaks restart from what is resident now (on CUDA the allocator's peak too)."""
        for state in self._pools.values():
            state.peak_bytes = state.resident_bytes
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def status(self) -> dict[str, Any]:
        """The account's numbers (all bytes). On CUDA also the allocator's own."""
        out: dict[str, Any] = {"measurement": self.measurement,
                               "device_limit_bytes": self.device_limit_bytes,
                               "moved_to_host_bytes": self.moved_to_host_bytes,
                               "moved_to_device_bytes": self.moved_to_device_bytes}
        for pool in POOLS:
            out[f"{pool}_resident_bytes"] = self.resident_bytes(pool)
            out[f"{pool}_peak_bytes"] = self.peak_bytes(pool)
        if self.is_cuda:
            out["allocator_bytes"] = torch.cuda.memory_allocated(self.device)
            out["allocator_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out


def _bucket(nbytes: int) -> int:
    """Host buffers come in powers of two (at least 4 KiB), so samples of other lengths reuse them."""
    return max(4096, 1 << (nbytes - 1).bit_length())


class HostPool:
    """Reused host buffers (uint8, 1-D) for offloaded storages; pinned when the device is CUDA.

    ``take(nbytes)`` returns a buffer of at least ``nbytes`` (a power-of-two bucket) registered in
    the account's host pool; ``give(buffer, event)`` unregisters it and keeps it for reuse once
    ``event`` (the last copy that touched it; None on CPU) has completed. ``max_free_bytes`` bounds
    the idle buffers kept; beyond it a returned buffer is freed.
    """

    def __init__(self, account: ResidencyAccount, *, max_free_bytes: int = 1 << 30) -> None:
        self.account, self.max_free_bytes = account, max_free_bytes
        self._is_pinned = account.is_cuda
        self._free: dict[int, list[tuple[torch.Tensor, torch.cuda.Event | None]]] = {}
        self.free_bytes = 0
        self.allocated_buffers = 0  # buffers created (a reused one is not counted again)

    def take(self, nbytes: int) -> torch.Tensor:
        size = _bucket(nbytes)
        bucket = self._free.get(size, [])
        for i, (buf, event) in enumerate(bucket):
            if event is None or event.query():  # type: ignore[no-untyped-call]  # torch: query() is unannotated; no host sync: a busy buffer is skipped
                del bucket[i]
                self.free_bytes -= size
                self.account.add("host", buf.untyped_storage())
                return buf
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=self._is_pinned)
        self.allocated_buffers += 1
        self.account.add("host", buf.untyped_storage())
        return buf

    def give(self, buf: torch.Tensor, event: torch.cuda.Event | None = None) -> None:
        self.account.remove("host", buf.untyped_storage())
        size = buf.numel()
        if self.free_bytes + size <= self.max_free_bytes:
            self._free.setdefault(size, []).append((buf, event))
            self.free_bytes += size

    def clear(self) -> None:
        """Frees every idle buffer (they are not in the account: only buffers in use are)."""
        self._free.clear()
        self.free_bytes = 0
