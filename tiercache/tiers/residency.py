"""Device residency of every layer's physical blocks, kept and changed by tensor ops only.

Per layer, on the compute device:
- ``device_slot[layer, pid]``: the device slot holding (layer, pid), or -1;
- ``host_row[layer, pid]``: the host row holding it, or the host tier's scratch row (then the
  disk tier holds it, or it is an open block on the device);
- ``slot_pid[layer, slot]``: the pid a slot holds, or -1;
- ``clock[layer, slot]``: when a step last read the slot (``now``), -1 if free, ``PINNED`` if
  it may not be evicted (a sequence's open block, its sink blocks, the scratch slot).

**A step's read** (``read_plan``, then ``lookup`` or ``resident``): while every block ever
written is also on the device (``all_on_device``: it fit when written, and nothing was evicted)
a step only looks its slots up. Otherwise ``resident`` turns the step's pids into device slots
in one fixed-shape pipeline: hits keep their slot, misses take the least recently used slots
that this call does not read, and every miss is copied from its host row by one gather (rows
that hit are routed to the scratch slot and scratch row, so nothing depends on how many
missed). No ``.item()``, ``nonzero`` or ``unique``: the step never waits for the device. When a
read needs more slots than are free, the plan splits it into groups that pass through the slots
one after another. Every sealed block is also in host memory or on disk (write-through), so
evicting a device copy never writes anything back.

The pinned slots of each layer are also counted on the host (``pinned``), so that a plan knows
how many slots one call may use without asking the device.

The pid axis has one extra column at ``pid_capacity`` and the slot axis one scratch slot at
``slots``, each the last of its axis: masked writes go there, and so does index -1 (the pid of a
free slot, the row of a block not in host memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CapacityError
from .device import DeviceSlab
from .host import HostTier

#: Clock value of a slot that may not be evicted.
PINNED = 1 << 62


@dataclass(frozen=True)
class ReadPlan:
    """How a read of ``n`` blocks per row gets its device slots: ``lookup`` (every block is on
    the device: look the slots up, move nothing), else ``resident`` calls of at most ``group``
    blocks per row each (one call when ``n <= group``; the parts' attention then merges)."""

    lookup: bool
    group: int


class Residency:
    """Residency tables of ``layers`` layers with ``slab.slots`` device slots each; misses are
    copied from ``host``'s rows (None: no host tier, so every block stays pinned on the device and
    nothing can miss)."""

    def __init__(self, slab: DeviceSlab, layers: int, host: HostTier | None) -> None:
        device = slab.kv.device
        self.slab = slab
        self.host = host
        host_scratch = host.slab.scratch if host is not None else 0
        self.slots = slab.slots
        self.slot_pid = torch.full((layers, slab.slots + 1), -1, dtype=torch.int64, device=device)
        self.clock = torch.full((layers, slab.slots + 1), -1, dtype=torch.int64, device=device)
        self.clock[:, slab.scratch] = PINNED
        self.device_slot = torch.full((layers, 1), -1, dtype=torch.int64, device=device)
        self.host_scratch = host_scratch
        self.host_row = torch.full((layers, 1), host_scratch, dtype=torch.int64, device=device)
        self.now = torch.zeros((), dtype=torch.int64, device=device)
        #: Lookups of ``resident`` that had to copy their block to the device (a device counter).
        self.device_misses = torch.zeros((), dtype=torch.int64, device=device)
        #: Block reads of steps (``lookup`` and ``resident``), counted on the host.
        self.lookups = 0
        #: Single tokens of one KV head read in place (token retrieval), and how many of them
        #: came from host memory.
        self.token_reads = 0
        self.host_token_reads = 0
        #: Pinned slots of each layer (open and sink blocks), counted on the host.
        self.pinned = [0] * layers
        #: Whether every sealed block was also placed on the device and none was evicted since.
        self.all_on_device = True
        # Constants as tensors: a Python scalar in torch.where costs an op per use.
        self._pinned = torch.tensor(PINNED, dtype=torch.int64, device=device)
        self._minus_one = torch.tensor(-1, dtype=torch.int64, device=device)
        self._scratch = torch.tensor(slab.scratch, dtype=torch.int64, device=device)
        # Per-layer views, made once: indexing a tensor by layer inside the step would cost an op.
        self.layer_kv = slab.kv.unbind(0)
        self._slot_pid, self._clock = self.slot_pid.unbind(0), self.clock.unbind(0)
        self._views()

    def _views(self) -> None:
        self._device_slot, self._host_row = self.device_slot.unbind(0), self.host_row.unbind(0)

    @property
    def pid_capacity(self) -> int:
        """Pids are below this; column ``pid_capacity`` is the scratch column."""
        return self.device_slot.shape[1] - 1

    def grow(self, pid_capacity: int) -> None:
        """Make room for pids below ``pid_capacity``."""
        if pid_capacity <= self.pid_capacity:
            return
        cap = max(pid_capacity, 2 * self.pid_capacity)
        for name, empty in (("device_slot", -1), ("host_row", self.host_scratch)):
            old = getattr(self, name)
            new = torch.full((old.shape[0], cap + 1), empty, dtype=torch.int64, device=old.device)
            new[:, : old.shape[1] - 1] = old[:, :-1]
            setattr(self, name, new)
        self._views()

    # ------------------------------------------------------------------ the step's pipeline

    def fits(self, rows: int, blocks: int) -> bool:
        """Whether ``blocks`` blocks of each of ``rows`` rows fit one layer's device slots."""
        return rows * blocks <= self.slots

    def free_slots(self, layer: int) -> int:
        """Device slots of ``layer`` that one ``resident`` call may use."""
        return self.slots - self.pinned[layer]

    def read_plan(self, layer: int, rows: int, blocks: int) -> ReadPlan:
        """How ``layer`` reads blocks of rows that hold ``blocks`` blocks each (``ReadPlan``). The
        first read that finds the blocks no longer all fit ends ``all_on_device``: from then on,
        reads may evict."""
        if self.all_on_device and self.fits(rows, blocks):
            return ReadPlan(True, blocks)
        self.all_on_device = False
        return ReadPlan(False, max(1, self.free_slots(layer) // rows))

    def lookup(self, layer: int, pids: torch.Tensor) -> torch.Tensor:
        """The device slots of ``pids`` of ``layer``, which the caller knows are all on the device
        (a ``lookup`` plan)."""
        self.lookups += pids.numel()
        return self._device_slot[layer][pids]

    def slot_of(self, layer: int, pids: torch.Tensor) -> torch.Tensor:
        """The device slots of ``pids`` of ``layer`` as they are (-1: not on the device)."""
        return self._device_slot[layer][pids]

    def count_token_reads(self, tokens: int, from_host: bool) -> None:
        """A step read ``tokens`` tokens of one KV head in place, from host memory or not."""
        self.token_reads += tokens
        self.host_token_reads += tokens if from_host else 0

    def host_row_of(self, layer: int, pids: torch.Tensor) -> torch.Tensor:
        """The host rows of ``pids`` of ``layer`` (the scratch row: not in host memory)."""
        return self._host_row[layer][pids]

    def resident(self, layer: int, pids: torch.Tensor) -> torch.Tensor:
        """Device slots ``(n,)`` holding ``pids`` ``(n,)`` of ``layer``, copying the misses from
        their host rows. The caller guarantees ``n`` slots that are not pinned, and that every pid
        is on the device or in host memory."""
        self.lookups += pids.numel()
        device_slot, slot_pid, clock = self._device_slot[layer], self._slot_pid[layer], self._clock[layer]
        self.now.add_(1)
        slot = device_slot[pids]
        miss = slot < 0
        # Slots this call reads are not victims: pin them in a copy of the clock (a miss's -1
        # indexes the scratch slot, pinned already).
        busy = clock.index_put((slot,), self._pinned)
        victims = busy.topk(pids.numel(), largest=False).indices
        # The k-th miss takes the k-th least recently used slot; hits write to the scratch slot.
        victim = torch.where(miss, victims[miss.cumsum(0) - 1], self._scratch)
        slots = torch.where(miss, victim, slot)
        # The victims' old pids lose their slot (-1, a free slot's pid, indexes the scratch
        # column); the misses get theirs (hits write their own slot back).
        device_slot.index_put_((slot_pid[victim],), self._minus_one)
        device_slot.index_put_((pids,), slots)
        slot_pid.index_put_((victim,), torch.where(miss, pids, self._minus_one))
        # Hits copy their host row (or the scratch row) to the scratch slot: a fixed shape.
        self.layer_kv[layer].index_copy_(0, victim, self._read_rows(self._host_row[layer][pids]))
        # max(): pinned slots the step reads (the open block, sinks) stay pinned.
        clock.scatter_reduce_(0, slots, self.now.expand(slots.numel()), "amax")
        self.device_misses.add_(miss.sum())
        return slots

    def _read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.host is None:  # every block is pinned on the device: nothing can miss
            return self.slab.kv[0, : rows.numel()]
        return self.host.read(rows)

    # ------------------------------------------------------------------ the write path

    def claim(self, layer: int, pids: torch.Tensor, pin: bool) -> torch.Tensor:
        """Device slots ``(n,)`` for new blocks ``pids`` ``(n,)`` of ``layer``, evicting the least
        recently used; pinned if ``pin`` (``CapacityError`` if fewer than ``n`` slots are free).
        The caller writes their data."""
        n = pids.numel()
        if n > self.free_slots(layer):
            raise CapacityError(
                f"layer {layer}: {n} more blocks to {'pin' if pin else 'place'} on the device, {self.free_slots(layer)} slots free of "
                f"{self.slots} ({self.pinned[layer]} pinned); raise device_budget_bytes")
        if pin:
            self.pinned[layer] += n
        device_slot, slot_pid, clock = self._device_slot[layer], self._slot_pid[layer], self._clock[layer]
        slots = clock.topk(pids.numel(), largest=False).indices
        device_slot.index_put_((slot_pid[slots],), self._minus_one)
        device_slot[pids] = slots
        slot_pid[slots] = pids
        clock[slots] = self._pinned if pin else self.now
        return slots

    def unpin(self, layer: int, slots: torch.Tensor) -> None:
        """Make pinned ``slots`` of ``layer`` evictable (as just used)."""
        self._clock[layer].index_put_((slots,), self.now)
        self.pinned[layer] -= slots.numel()

    def pin(self, layer: int, slots: torch.Tensor) -> None:
        """Keep ``slots`` of ``layer`` (resident, not pinned) on the device until unpinned."""
        self._clock[layer].index_put_((slots,), self._pinned)
        self.pinned[layer] += slots.numel()

    def drop_stale(self, layer: int, pids: torch.Tensor) -> None:
        """``pids`` of ``layer`` were written anew elsewhere: drop their device copies unless
        pinned (a pinned copy is an open block, the very source of the new content)."""
        device_slot, slot_pid, clock = self._device_slot[layer], self._slot_pid[layer], self._clock[layer]
        slots = device_slot[pids]
        stale = (slots >= 0) & (clock[slots] != PINNED)
        gone = torch.where(stale, slots, self._scratch)
        slot_pid.index_put_((gone,), self._minus_one)
        clock.index_put_((gone,), torch.where(stale, self._minus_one, self._pinned))
        device_slot.index_put_((torch.where(stale, pids, self._minus_one),), self._minus_one)

    def forget(self, pids: torch.Tensor) -> None:
        """Drop ``pids`` from every layer's device slots and host rows (their storage was freed;
        one host sync, between forwards, to count the pinned slots freed)."""
        slots = self.device_slot[:, pids]
        pinned = (self.clock.gather(1, slots.clamp(min=0)) == PINNED) & (slots >= 0)
        for layer, n in enumerate(pinned.sum(1).tolist()):
            self.pinned[layer] -= n
        slots = torch.where(slots >= 0, slots, self.slots)
        self.slot_pid.scatter_(1, slots, -1)
        self.clock.scatter_(1, slots, -1)
        self.clock[:, self.slots] = PINNED
        self.device_slot[:, pids] = -1
        self.host_row[:, pids] = self.host_scratch
