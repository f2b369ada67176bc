"""Preallocated slabs of block slots.

A pool allocates its whole slab once; a block then occupies one slot, found and freed in O(1)
through a free list, so the hot path never allocates a tensor per block.
"""

from __future__ import annotations

import torch

from .blocks import BlockLayout
from .errors import CapacityError


class SlotPool:
    """A fixed number of slots with an O(1) free list."""

    def __init__(self, num_slots: int, what: str) -> None:
        self.num_slots = num_slots
        self._what = what
        # Pop from the end so slots are handed out in increasing order (nicer to debug).
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        """Slots not holding a block."""
        return len(self._free)

    def alloc(self) -> int:
        """Take a free slot; ``CapacityError`` if there is none."""
        if not self._free:
            raise CapacityError(f"{self._what}: all {self.num_slots} slots are taken")
        return self._free.pop()

    def free(self, slot: int) -> None:
        """Return ``slot`` to the free list."""
        self._free.append(slot)


class DevicePool(SlotPool):
    """Block slots on the compute device, holding raw keys and values.

    ``slab[slot]`` has shape ``(2, kv_heads, block_tokens, head_dim)``: keys then values.
    """

    def __init__(self, layout: BlockLayout, budget_bytes: int, device: torch.device) -> None:
        super().__init__(budget_bytes // layout.nbytes, "device pool")
        self.layout = layout
        self.slot_nbytes = layout.nbytes
        # Zeroed once so positions past a partial block's tokens never hold NaN bit patterns.
        self.slab = torch.zeros((self.num_slots, 2, *layout.shape), dtype=layout.dtype, device=device)


class HostPool(SlotPool):
    """Slots of ``slot_nbytes`` bytes each in host memory, pinned when CUDA is present so copies to
    and from the device run as DMA. ``slab[slot]`` is a 1-D uint8 row holding one encoded block."""

    def __init__(self, slot_nbytes: int, budget_bytes: int, pin: bool | None = None) -> None:
        super().__init__(budget_bytes // slot_nbytes if slot_nbytes else 0, "host pool")
        self.slot_nbytes = slot_nbytes
        pin = torch.cuda.is_available() if pin is None else pin
        self.slab = torch.zeros((self.num_slots, slot_nbytes), dtype=torch.uint8, pin_memory=pin)
