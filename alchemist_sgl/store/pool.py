"""A reused, pre-faulted pool of fixed-size page slots in one preallocated tensor.

Owns the memory of one store tier (device or host). Must not import sglang.

Note [Reused pool]: PLATFORM.md "Measured costs": cloning each projection output per prefill made
TTFT x1.8 and holding references x1.66 (allocator churn), copying into a pre-touched reused buffer
x1.11. So a tier is ONE tensor ``[num_slots, slot_elements]`` allocated and zero-filled (every page
faulted in) at construction; the put path only copies into slot views, never allocates. A slot
holds one store page: for each planned tensor, in plan order, a contiguous block
``[layers, page_tokens, width]``.
"""

from __future__ import annotations

import torch

from alchemist_sgl.record.plan import RecordPlan


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
        self._free = list(range(self.num_slots - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_bytes(self) -> int:
        return (self.num_slots - len(self._free)) * self.slot_bytes

    def take(self) -> int | None:
        """A free slot index, or None when every slot is in use."""
        return self._free.pop() if self._free else None

    def give_back(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots
        self._free.append(slot)

    def copy_slot(self, slot: int, other: SlotPool, other_slot: int) -> None:
        """Copies one whole page from ``other`` (same plan) into ``slot`` of this pool."""
        self.buffer[slot].copy_(other.buffer[other_slot])
