"""Host staging: copies of recorded rows from the serving device into reused host buffers.

Owns the device-to-host leg of recording: a bounded ring of reused host buffers, the copy into
them and the wait before a buffer is read or reused. Knows nothing of the store (a ``sink``
callback receives each finished copy). Must not import sglang; imports torch only.

Note [Async recording copies]: on CUDA a recorded projection output lives in device memory and
the store's host tier in host memory. A plain ``.to("cpu")`` is a host sync per tensor and layer:
the scheduler thread stops launching the forward's kernels until every earlier kernel and the copy
are done, so prefill runs at the pace of one PCIe copy per projection. Instead, per output:
  1. on the CURRENT (forward) stream, gather the recorded rows into a fresh device tensor (one
     device-to-device copy). This is the snapshot: later kernels of the forward overwrite the
     output in place (fused add-rmsnorm on o/down, RoPE on the q/k part of qkv, LoRA adds), and
     the snapshot is ordered before them on the same stream. Reading the output itself from
     another stream would race those kernels;
  2. the side stream (one per staging, ``torch.cuda.Stream``) waits for the current stream, then
     copies the snapshot into a PINNED host buffer with ``non_blocking=True`` (a true async DMA;
     into pageable memory it would be staged and synchronous), and records an event;
  3. ``snapshot.record_stream(side)`` keeps the caching allocator from handing the snapshot's
     memory to a later allocation of the forward stream before the side stream has read it, and
     the in-flight entry holds the snapshot too (keep-alive);
  4. the host waits on the event (``Event.synchronize``) only when it must: before the buffer is
     read by the sink, which happens when the ring is full (the oldest copy is retired to make
     room) or at the end of the forward (``flush``). A buffer is reused only after its retirement.
The copies thus overlap the forward's compute; the host blocks at most on a copy ``depth`` outputs
old, and once per forward on the last ones (the forward ends in a host sync for sampling anyway;
under SGLang's overlap scheduler this flush costs the overlap of that one forward).

Note [Recording is PCIe-bound on an H200]: a Llama-3-8B layer (hidden 4096, 8 KV heads, FFN
14336) has 6144 + 4096 + 28672 + 4096 = 43008 output elements per token over the four projections,
86 KB in bf16, while its forward is ~0.44 GFLOP per token. At ~50 GB/s of pinned PCIe Gen5 that
is ~1.7 us of copy against ~0.6 us of compute per token and layer at ~700 TFLOP/s: with the full
plan the copy, not the forward, sets the prefill pace even when perfectly overlapped. ``down``
alone (4096 elements) or a device tier for hot pages keeps it under the compute. The sink's
scatter into the (pageable) host tier is a host memcpy on the scheduler thread; a pinned host tier
written by the DMA directly, page run by page run, would remove it (not done: many small copies).

Sizes: the ring holds at most ``depth`` buffers, each grown (never shrunk) to the largest
``rows x width`` it was asked to hold, so pinned host memory is bounded by
``depth x max(rows x width) x element size``; the device snapshots in flight are bounded by the
same ``depth``. On CPU (``device`` is cpu) the same ring runs with plain synchronous copies into
ordinary host buffers: no pinned memory, no streams, no events.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import torch

Tag = TypeVar("Tag")  # what the caller tags a copy with (capture.py: (batch, tensor name, layer))


@dataclass
class _InFlight(Generic[Tag]):
    tag: Tag
    buffer: int                      # index into HostStaging._buffers
    rows: torch.Tensor               # [rows, width] view of the buffer (host)
    snapshot: torch.Tensor | None    # keep-alive of the device snapshot until the copy is done
    event: torch.cuda.Event | None   # recorded after the copy (None on CPU)


class HostStaging(Generic[Tag]):
    """A ring of ``depth`` reused host buffers that device outputs are copied into.

    ``put(tag, output, index)`` copies ``output[index]`` (``output`` [rows, width]; ``index`` a
    slice or a 1-D long tensor on ``output``'s device) into a free buffer and hands
    ``(tag, host_rows)`` to ``sink`` once the copy is complete: at the latest in ``flush()``, or
    earlier when the ring is full. ``discard()`` waits for every copy in flight and drops them
    without calling the sink. Not thread-safe: the scheduler thread owns it.
    """

    def __init__(self, depth: int, dtype: torch.dtype, device: torch.device | str,
                 sink: Callable[[Tag, torch.Tensor], None]) -> None:
        if depth < 1:
            raise ValueError(f"staging depth must be >= 1, got {depth}")
        self.depth = depth
        self.dtype = dtype
        self.device = torch.device(device)
        self.is_async = self.device.type == "cuda"
        self._sink = sink
        self._stream = (torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]  # torch: Stream() is unannotated
                        if self.is_async else None)
        self._buffers: list[torch.Tensor] = []   # flat [capacity elements] each
        self._free: list[int] = []
        self._in_flight: deque[_InFlight[Tag]] = deque()
        self.copies = 0
        self.ring_full_waits = 0   # retirements forced by a full ring (host waited mid-forward)
        self.buffer_growths = 0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def capacity_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers)

    def put(self, tag: Tag, output: torch.Tensor, index: slice | torch.Tensor) -> None:
        if output.dim() != 2:
            raise ValueError(f"staging expects a [rows, width] output, got shape {tuple(output.shape)}")
        if output.dtype != self.dtype:
            raise ValueError(f"staging holds {self.dtype}, the output is {output.dtype}")
        if isinstance(index, slice):
            n = len(range(*index.indices(output.shape[0])))
        else:
            n = int(index.numel())
        width = output.shape[1]
        slot = self._take(n * width)
        rows = self._buffers[slot][:n * width].view(n, width)
        if not self.is_async:
            # CPU: the copy into the reused buffer is the snapshot; complete on return.
            if isinstance(index, slice):
                rows.copy_(output[index])
            else:
                torch.index_select(output, 0, index, out=rows)
            self._in_flight.append(_InFlight(tag, slot, rows, None, None))
            self.copies += 1
            return
        # Note [Async recording copies], steps 1-3.
        forward_stream = torch.cuda.current_stream(self.device)
        snapshot = output[index].clone() if isinstance(index, slice) else \
            torch.index_select(output, 0, index)
        side = self._stream
        assert side is not None  # made at construction when is_async
        side.wait_stream(forward_stream)
        with torch.cuda.stream(side):
            rows.copy_(snapshot, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch: Event() is unannotated
            event.record(side)
        snapshot.record_stream(side)
        self._in_flight.append(_InFlight(tag, slot, rows, snapshot, event))
        self.copies += 1

    def flush(self) -> None:
        """Hands every copy in flight to the sink, oldest first (host waits on each)."""
        while self._in_flight:
            self._retire()

    def discard(self) -> None:
        """Drops the copies in flight without the sink; their buffers are free again after."""
        while self._in_flight:
            entry = self._in_flight.popleft()
            if entry.event is not None:
                entry.event.synchronize()  # host sync: the DMA may still write into the buffer
            self._free.append(entry.buffer)

    def status(self) -> dict[str, object]:
        return {"mode": "pinned-async" if self.is_async else "plain-copy", "depth": self.depth,
                "buffers": len(self._buffers), "capacity_bytes": self.capacity_bytes,
                "copies": self.copies, "ring_full_waits": self.ring_full_waits,
                "buffer_growths": self.buffer_growths}

    def _retire(self) -> None:
        entry = self._in_flight.popleft()
        try:
            if entry.event is not None:
                entry.event.synchronize()  # host sync: Note [Async recording copies], step 4
            self._sink(entry.tag, entry.rows)
        finally:
            entry.snapshot = None
            self._free.append(entry.buffer)

    def _take(self, elements: int) -> int:
        """A buffer not in flight holding >= ``elements``: free, new (under depth), or retired."""
        if not self._free and len(self._buffers) < self.depth:
            self._buffers.append(self._allocate(elements))
            return len(self._buffers) - 1
        if not self._free:
            self.ring_full_waits += 1
            self._retire()
        fitting = [i for i in self._free if self._buffers[i].numel() >= elements]
        slot = min(fitting, key=lambda i: self._buffers[i].numel()) if fitting else \
            max(self._free, key=lambda i: self._buffers[i].numel())
        self._free.remove(slot)
        if self._buffers[slot].numel() < elements:
            # Not in flight (it is free), so dropping the old buffer is safe. Doubling bounds the
            # number of growths (pinned allocations are slow) to a logarithm of the final size.
            self._buffers[slot] = self._allocate(max(elements, 2 * self._buffers[slot].numel()))
            self.buffer_growths += 1
        return slot

    def _allocate(self, elements: int) -> torch.Tensor:
        return torch.empty(max(elements, 1), dtype=self.dtype, pin_memory=self.is_async)
