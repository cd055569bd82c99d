"""Layer-ordered offload and reload of the tensors autograd saves in training's forward units.

Owns ``SavedTensorOffload``: per forward unit (key = (sample, layer), units.py Note [Work units])
it registers every tensor autograd saves in a ``ResidencyAccount`` (residency.py), moves a unit's
saved storages to host after its forward (``offload``), brings them back before its backward
(``prefetch``; an unpack that finds them on host reloads at once) and drops them after it
(``release``). Imports only torch and lower train/ modules.

Note [Saved-tensor offload]:
  * What is tracked: ``saving(key)`` installs ``torch.autograd.graph.saved_tensors_hooks`` for the
    unit's forward. Pack registers the saved tensor's STORAGE (once per storage per unit) and
    returns a handle (storage record + dtype, offset, size, stride); unpack rebuilds the tensor on
    whatever storage is resident then, so a reloaded tensor has the original's dtype, strides,
    offset and bytes: the backward runs the same kernels on the same values, and the step is
    bitwise the one without offload. Not tracked: tensors on another device, and storages in the
    protected set (``protect``: base weights, adapter parameters, the RoPE cache, matched by
    ``data_ptr``): they live anyway, moving them would free nothing.
  * What moves: ``keep(key, tensors)`` registers a unit's boundary tensors (its input and output
    streams), which the run holds until that layer's backward. ``offload`` moves only storages
    whose sole holder in the account's device pool is that one record: a saved tensor that is
    also a boundary (the residual a norm saves) or is saved by two units stays resident, because
    copying it would free nothing. So the device pool falls by exactly the bytes moved.
  * Order: the caller offloads unit (s, l) right after its forward (layer 0 first) and before the
    backward of layer l prefetches l and l - 1 (last layer first, one layer ahead), then releases
    l. ``offload_all`` (a yield) moves every unit in the order they were saved.
  * CUDA: copies run on one side stream. Offload: the side stream waits for the compute stream
    (the saved tensors were written there), copies into a reused pinned buffer, and the source
    storage is marked with ``record_stream(side)`` before it is dropped, so the allocator does not
    hand it out while the copy still reads it. Prefetch allocates the destination on the side
    stream and records an event; unpack makes the compute stream wait for that event and marks
    the storage ``record_stream(compute)`` before autograd uses it. A host buffer goes back to
    the pool with the event of its last copy and is reused only once that event has completed.
    On CPU every copy is synchronous and there are no streams or events.

Note [Yield moves memory]: when the memory arbiter leaves TRAINING (a spike) while a step is in
flight, the runtime calls ``yield_memory``: ``offload_all`` moves every tracked unit's movable
storages to host in forward order (layer 0 first), then the device's idle workspace goes back
(CUDA: ``torch.cuda.empty_cache`` returns the caching allocator's free blocks to the driver; a
block a side-stream copy still reads is not free yet and stays; CPU: there is no caching
allocator, so nothing is held to release). Forward units were offloaded right after their forward
already, so what a yield moves is what the backward had brought back: the unit being prefetched
one layer ahead. Boundaries (``keep``) stay. On resume, the next backward unit's ``prefetch``
reloads what the yield moved, as usual: the step stays bitwise the one without a yield.

Note [Saved tensors under compile]: under ``torch.compile`` an AOT-autograd graph's saved tensors
are packed and unpacked as a group (pytorch#148222: unpack of one unpacks all of that graph). That
is harmless here because a graph never spans more than one unit: each layer's forward is its own
autograd graph (it starts from detached leaves), so "all of a graph" is exactly the one unit that
is being prefetched anyway. A compiled region spanning several layers would break the layer order.
The hooks act at run time, outside the compiled code: a graph compiled before serving (without
hooks) runs under them without a recompile, and its saved tensors pass through pack and unpack
(seen with torch 2.13 on CPU: the same counters of captured graphs, bitwise equal gradients).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Iterator, Protocol

import torch

from alchemist_sgl.train.lora import FrozenLora, LoraAdapter
from alchemist_sgl.train.ops import RopeCache
from alchemist_sgl.train.residency import HostPool, ResidencyAccount
from alchemist_sgl.train.weights import BaseWeights

Key = Hashable  # (sample, layer) in units.py


class LongLived(Protocol):
    """The trainer's long-lived parts (``ReplayTrainer`` has them)."""

    @property
    def weights(self) -> BaseWeights: ...
    @property
    def rope(self) -> RopeCache: ...
    @property
    def adapter(self) -> LoraAdapter: ...
    @property
    def published(self) -> FrozenLora | None: ...


def long_lived_tensors(trainer: LongLived) -> list[torch.Tensor]:
    """What a ``ReplayTrainer`` keeps across steps and autograd may save: the base weights, the
    adapter's parameters, the published adapter's tensors and the RoPE tables (for ``protect``;
    the RoPE cache can grow, so protect again at each step)."""
    w = trainer.weights
    out = [w.embed, w.final_norm, w.lm_head, trainer.rope.cos, trainer.rope.sin]
    for lw in w.layers:
        out += [lw.qkv, lw.o, lw.gate_up, lw.down, lw.input_layernorm, lw.post_attention_layernorm]
    out += list(trainer.adapter.parameters())
    if trainer.published is not None:
        out += [*trainer.published.a.values(), *trainer.published.b.values()]
    return out


def _u8(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """A 1-D uint8 tensor over the whole of ``storage`` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


@dataclass
class _Stored:
    """One storage of a unit: resident on the device (``device``) or held in ``host``."""
    nbytes: int
    device: torch.UntypedStorage | None
    is_movable: bool
    host: torch.Tensor | None = None       # uint8 host buffer while offloaded
    ready: torch.cuda.Event | None = None  # CUDA event: the reload into ``device`` is done
    host_event: torch.cuda.Event | None = None  # CUDA event: the last copy touching ``host``


def _on_device(s: _Stored) -> torch.UntypedStorage:
    assert s.device is not None  # callers move only resident storages
    return s.device


def _on_host(s: _Stored) -> torch.Tensor:
    assert s.host is not None  # callers reload only offloaded storages
    return s.host


@dataclass
class _Handle:
    """What autograd keeps for one saved tensor while its unit is tracked."""
    stored: _Stored
    dtype: torch.dtype
    offset: int
    size: torch.Size
    stride: tuple[int, ...]


@dataclass
class _Unit:
    storages: dict[int, _Stored] = field(default_factory=dict)  # data_ptr at pack -> record
    is_offloaded: bool = False


class SavedTensorOffload:
    """Saved-tensor tracking for every forward unit; moving them when ``is_enabled``.

    With ``is_enabled=False`` the same tensors are tracked (so the account measures the run) but
    ``offload``/``prefetch``/``offload_all`` move nothing. Contract: ``saving(key)`` wraps exactly
    one forward unit's graph construction, keys are unique among live units, and ``release(key)``
    follows that layer's backward (or the run's abandonment: ``release_all``). The scheduler
    thread owns it. See Note [Saved-tensor offload].
    """

    def __init__(self, account: ResidencyAccount, *, is_enabled: bool = True,
                 host_pool: HostPool | None = None) -> None:
        self.account, self.is_enabled = account, is_enabled
        self.device = account.device
        self.host_pool = host_pool or HostPool(account)
        self._protected: set[int] = set()
        self._units: dict[Key, _Unit] = {}  # insertion order = forward order
        self._side = (torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]  # torch: Stream() is unannotated
                      if account.is_cuda else None)
        self.late_reloads = 0  # unpacks that found their storage on host (no prefetch in time)
        self.yields = 0  # yield_memory calls (Note [Yield moves memory])
        self.yield_moved_bytes = 0  # bytes those calls moved to host

    def protect(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sets the storages never tracked: long-lived tensors (weights, adapter parameters,
        caches). Replaces the previous set, so a freed cache's address is not protected forever."""
        self._protected = {t.untyped_storage().data_ptr() for t in tensors}

    @contextlib.contextmanager
    def saving(self, key: Key) -> Iterator[None]:
        """Registers every tensor autograd saves inside the block under ``key``."""
        if key in self._units:
            raise ValueError(f"unit {key!r} is already tracked; release it first")
        unit = self._units[key] = _Unit()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(unit, t), self._unpack):
            yield

    def keep(self, key: Key, tensors: Iterable[torch.Tensor | None]) -> None:
        """Registers boundary tensors of ``key`` (resident until ``release``; never moved)."""
        unit = self._units[key]
        for t in tensors:
            if t is not None and t.device == self.device:
                self._record(unit, t.untyped_storage(), is_movable=False)

    def offload(self, key: Key) -> int:
        """Moves ``key``'s movable saved storages to host; returns the bytes moved."""
        unit = self._units[key]
        if not self.is_enabled or unit.is_offloaded:
            return 0
        unit.is_offloaded = True
        moving = [s for s in unit.storages.values() if s.is_movable and s.device is not None
                  and self.account.holders("device", s.device) == 1]
        if not moving:
            return 0
        if self._side is None:
            for s in moving:
                host = s.host = self.host_pool.take(s.nbytes)
                host[:s.nbytes].copy_(_u8(_on_device(s), self.device))
                self._drop_device(s)
        else:
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                for s in moving:
                    host = s.host = self.host_pool.take(s.nbytes)
                    src = _u8(_on_device(s), self.device)
                    host[:s.nbytes].copy_(src, non_blocking=True)
                    src.record_stream(self._side)  # the allocator waits for the copy
                    self._drop_device(s)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch: Event() is unannotated
                event.record(self._side)
            for s in moving:
                s.host_event = event
        moved = sum(s.nbytes for s in moving)
        self.account.moved_to_host_bytes += moved
        return moved

    def prefetch(self, key: Key) -> int:
        """Starts bringing ``key``'s offloaded storages back (CPU: done on return); bytes moved.
        A key that is not tracked (layer -1, or already released) is ignored."""
        unit = self._units.get(key)
        if unit is None or not unit.is_offloaded:
            return 0
        unit.is_offloaded = False
        back = [s for s in unit.storages.values() if s.host is not None]
        for s in back:
            self._reload(s)
        moved = sum(s.nbytes for s in back)
        self.account.moved_to_device_bytes += moved
        return moved

    def release(self, key: Key) -> None:
        """Forgets ``key``: its device storages and host buffers leave the account."""
        unit = self._units.pop(key, None)
        if unit is None:
            return
        for s in unit.storages.values():
            if s.device is not None:
                if s.ready is not None:  # a prefetch nobody unpacked: finish it before freeing
                    torch.cuda.current_stream(self.device).wait_event(s.ready)
                self.account.remove("device", s.device)
                s.device = None
            if s.host is not None:
                self.host_pool.give(s.host, s.host_event)
                s.host = None

    def offload_all(self) -> int:
        """Moves every tracked unit to host in the order they were saved; bytes moved."""
        return sum(self.offload(key) for key in list(self._units))

    def yield_memory(self) -> int:
        """Note [Yield moves memory]: every tracked unit to host, layer 0 first, and the device's
        idle workspace released; returns the bytes moved."""
        moved = self.offload_all()
        if self.account.is_cuda:
            torch.cuda.empty_cache()
        self.yields += 1
        self.yield_moved_bytes += moved
        return moved

    def status(self) -> dict[str, Any]:
        """The account's numbers (residency.py) plus this offloader's counters."""
        return {**self.account.status(), "is_enabled": self.is_enabled,
                "units_tracked": len(self._units), "late_reloads": self.late_reloads,
                "yields": self.yields, "yield_moved_bytes": self.yield_moved_bytes}

    def release_all(self) -> None:
        for key in list(self._units):
            self.release(key)

    # -- hooks ---------------------------------------------------------------------------------

    def _pack(self, unit: _Unit, t: torch.Tensor) -> torch.Tensor | _Handle:
        if t.device != self.device or t.layout != torch.strided:
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() in self._protected or storage.nbytes() == 0:
            return t
        stored = self._record(unit, storage, is_movable=True)
        return _Handle(stored, t.dtype, int(t.storage_offset()), t.size(), t.stride())

    def _unpack(self, packed: torch.Tensor | _Handle) -> torch.Tensor:
        if not isinstance(packed, _Handle):
            return packed
        s = packed.stored
        if s.device is None:
            if s.host is None:
                raise RuntimeError("a saved tensor was unpacked after its unit was released")
            self.late_reloads += 1
            self._reload(s)
            self.account.moved_to_device_bytes += s.nbytes
        t = torch.empty(0, dtype=packed.dtype, device=self.device).set_(
            _on_device(s), packed.offset, packed.size, packed.stride)
        if s.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(s.ready)
            t.record_stream(compute)  # allocated on the side stream, used on the compute stream
        return t

    # -- moves ---------------------------------------------------------------------------------

    def _record(self, unit: _Unit, storage: torch.UntypedStorage, *, is_movable: bool) -> _Stored:
        ptr = storage.data_ptr()
        stored = unit.storages.get(ptr)
        if stored is not None:
            stored.is_movable = stored.is_movable and is_movable
            return stored
        self.account.add("device", storage)  # may raise DeviceBudgetExceeded: nothing recorded
        stored = unit.storages[ptr] = _Stored(storage.nbytes(), storage, is_movable)
        return stored

    def _drop_device(self, s: _Stored) -> None:
        self.account.remove("device", _on_device(s))
        s.device = None  # the last reference: the storage is freed (CUDA: once the copy is done)

    def _reload(self, s: _Stored) -> None:
        host = _on_host(s)
        if self._side is None:
            dst = torch.empty(s.nbytes, dtype=torch.uint8, device=self.device)
            self.account.add("device", dst.untyped_storage())
            dst.copy_(host[:s.nbytes])
            self.host_pool.give(host)
        else:
            with torch.cuda.stream(self._side):
                dst = torch.empty(s.nbytes, dtype=torch.uint8, device=self.device)
                self.account.add("device", dst.untyped_storage())
                dst.copy_(host[:s.nbytes], non_blocking=True)
                s.ready = torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch: Event() is unannotated
                s.ready.record(self._side)
            self.host_pool.give(host, s.ready)
        s.device, s.host, s.host_event = dst.untyped_storage(), None, None
