"""A reused, pre-faulted pool of fixed-size page slots in one preallocated tensor.

Owns the memory of one store tier (device or host). Must not import sglang.

Note [Reused pool] (docs/recording-and-replay.md): cloning each projection output per prefill made
TTFT x1.8 and holding references x1.66 (allocator churn), copying into a pre-touched reused buffer
x1.11. So a tier is ONE tensor ``[num_slots, slot_elements]`` allocated and zero-filled (every page
faulted in) at construction; the put path only copies into slot views, never allocates. A slot
holds one store page: for each planned tensor, in plan order, a contiguous block
``[layers, page_tokens, width]``. A slot can instead hold up to ``kept_per_slot`` demoted pages, each
only the block of the plan's ``keep_on_demotion`` tensor (store/index.py, Note [Demote before
evict]): ``kept_views`` splits the slot into such blocks from its start.
"""

from __future__ import annotations

import torch

from alchemist_sgl.core.plan import RecordPlan


class SlotPool:
    """Fixed slots of one tier. Not thread-safe: the scheduler thread owns it.

    ``num_slots`` = capacity_bytes // plan.slot_bytes (0 is allowed: the tier is absent).
    ``tensor_views[name]`` is a (strided) view ``[num_slots, layers, page_tokens, width]`` into the
    buffer; writes through it land in the pool.
    """

    def __init__(self, plan: RecordPlan, capacity_bytes: int, dtype: torch.dtype,
                 device: torch.device | str, tier: str) -> None:
        element_bytes = torch.empty((), dtype=dtype).element_size()
        if element_bytes != plan.shape.dtype_bytes:
            raise ValueError(f"pool dtype {dtype} has {element_bytes} bytes per element, the plan "
                             f"says {plan.shape.dtype_bytes}")
        self.tier = tier
        self.plan = plan
        self.slot_bytes = plan.slot_bytes
        self.num_slots = capacity_bytes // plan.slot_bytes if plan.slot_bytes else 0
        slot_elements = plan.elements_per_token * plan.page_tokens
        # Zero-filled: every page of the pool is touched now, not on the serving path.
        self.buffer = torch.zeros((self.num_slots, slot_elements), dtype=dtype, device=device)
        self.tensor_views: dict[str, torch.Tensor] = {}
        offset = 0
        layers, page = plan.shape.layers, plan.page_tokens
        for name, width in plan.widths.items():
            size = layers * page * width
            self.tensor_views[name] = self.buffer[:, offset:offset + size].view(
                self.num_slots, layers, page, width)
            offset += size
        self.kept_name = plan.keep_on_demotion
        self.kept_per_slot = 0
        self.kept_views: torch.Tensor | None = None
        if self.kept_name is not None:
            block = layers * page * plan.widths[self.kept_name]
            self.kept_per_slot = slot_elements // block
            self.kept_views = self.buffer[:, :self.kept_per_slot * block].view(
                self.num_slots, self.kept_per_slot, layers, page, plan.widths[self.kept_name])
        self._free = list(range(self.num_slots - 1, -1, -1))

    @property
    def used_bytes(self) -> int:
        return (self.num_slots - len(self._free)) * self.slot_bytes

    def take(self) -> int | None:
        """A free slot index, or None when every slot is in use."""
        return self._free.pop() if self._free else None

    def give_back(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots
        self._free.append(slot)

    def page_view(self, slot: int, sub: int | None, name: str) -> torch.Tensor:
        """[layers, page_tokens, width] of tensor ``name`` of the page in ``slot`` (a full page when
        ``sub`` is None, else demoted page ``sub`` of the slot, which holds only ``kept_name``)."""
        if sub is None:
            return self.tensor_views[name][slot]
        if name != self.kept_name or self.kept_views is None:
            raise KeyError(f"a demoted page holds only {self.kept_name!r}, not {name!r}")
        return self.kept_views[slot, sub]

    def copy_slot(self, slot: int, other: SlotPool, other_slot: int) -> None:
        """Copies one whole page from ``other`` (same plan) into ``slot`` of this pool."""
        self.buffer[slot].copy_(other.buffer[other_slot])
