"""``TierManager``: every layer's blocks, by physical id (pid), in the device slab, host memory
and the backing tiers (local disk, a Redis server).

Under the decode step's tensor pipeline (``residency.Residency``), this is the Python
bookkeeping of the slower tiers:

- **Write-through.** A block is written to host memory when it is sealed (full), so a device
  copy is always clean and evicting it writes nothing. Open blocks (being appended to) and sink
  blocks are pinned on the device.
- **Backing tiers.** Below host memory, an ordered list: the disk tier (the ``DiskStore``
  records of ``tiercache.tiers.disk``) if ``disk_budget_bytes``, then the remote tier
  (``tiercache.tiers.remote``, Redis) if ``remote_url``; blocks are keyed ``BlockKey(0, layer,
  pid)``. A write-through tier (the remote one) gets every block as it is sealed. When host
  memory is full, its oldest rows are demoted to the first backing tier (the disk, whose copies
  are never evicted, if there is one; written only if it does not hold them yet); a block read
  back keeps its copies, so demoting it again writes nothing.
- **Misses below host.** A step whose layer has blocks held only below host memory checks its
  pids first (one host sync) and reads those blocks into host memory from the first backing
  tier holding each, before the tensor pipeline runs. This is the one case where a step waits;
  ``TierStats.disk_waits`` counts it. With no block of the layer held only below host, nothing
  is checked and nothing waits.

Units: budgets and sizes in bytes, blocks of ``layout.block_tokens`` tokens, slots per layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..blocks import BlockKey, BlockLayout, TierName
from ..config import TierConfig
from ..errors import CapacityError, ConfigError
from ..io.codec import make_codec
from .base import BackingTier
from .device import DeviceSlab
from .host import HostTier
from .residency import Residency


@dataclass
class TierStats:
    """Counters since the manager was created, in blocks unless named otherwise.

    - ``lookups``: block reads of decode and prefill steps; ``hits[tier]``: where each was found
      (``lookups == sum(hits.values())``).
    - ``moved_bytes["src->dst"]``: bytes copied between tiers, in the destination's encoding.
    - ``disk_waits`` / ``wait_seconds``: steps that waited for a backing tier (disk or remote),
      and how long (s).
    - ``peak_bytes[tier]``: the most bytes the tier held.
    - ``tokens_read`` / ``tokens_from_host``: single tokens of one KV head that token retrieval
      read in place, and how many of them came from host memory (their bytes count in
      ``moved_bytes["host->device"]``).
    """

    lookups: int = 0
    hits: dict[str, int] = field(default_factory=lambda: {t.value: 0 for t in TierName})
    demotions: int = 0
    moved_bytes: dict[str, int] = field(default_factory=dict)
    disk_waits: int = 0
    wait_seconds: float = 0.0
    peak_bytes: dict[str, int] = field(default_factory=lambda: {t.value: 0 for t in TierName})
    tokens_read: int = 0
    tokens_from_host: int = 0

    @property
    def device_misses(self) -> int:
        """Block reads that had to copy their block to the device."""
        return self.lookups - self.hits[TierName.DEVICE.value]

    def copy(self) -> "TierStats":
        return replace(self, hits=dict(self.hits), moved_bytes=dict(self.moved_bytes),
                       peak_bytes=dict(self.peak_bytes))


class TierManager:
    """The tiers of one model's KV: ``layers`` layers of ``layout`` blocks, placed within
    ``config``'s budgets. ``slots``: device slots per layer (default: the device budget split
    evenly over the layers)."""

    def __init__(self, config: TierConfig, layout: BlockLayout, layers: int, slots: int | None = None) -> None:
        config.check_budgets(layout)
        if layout.block_tokens != config.block_tokens:
            raise ConfigError(f"layout has blocks of {layout.block_tokens} tokens, the config "
                              f"{config.block_tokens}: build the layout with config.layout(...)")
        self.config = config
        self.layout = layout
        self.layers = layers
        self.device = torch.device(config.device)
        slots = config.device_budget_bytes // (layers * layout.nbytes) if slots is None else slots
        if slots < 1:
            raise ConfigError(
                f"device_budget_bytes={config.device_budget_bytes} is less than one block per layer: "
                f"{layers} layers x {layout.nbytes} bytes = {layers * layout.nbytes} bytes"
            )
        self.slab = DeviceSlab(layout, layers, slots, self.device)
        self.host: HostTier | None = None
        if config.host_budget_bytes > 0:
            host = HostTier(layout, config.host_budget_bytes, make_codec(config.host_codec, **config.host_codec_params))
            self.host = host if host.slab.rows else None
        self.residency = Residency(self.slab, layers, self.host)
        #: The tiers below host memory, fastest first.
        self.backing: list[BackingTier] = []
        try:
            if config.disk_budget_bytes > 0:
                from .disk import DiskTier

                self.backing.append(DiskTier.from_config(config, layout))
            if config.remote_url is not None:
                from .remote import RemoteTier

                self.backing.append(RemoteTier.from_config(config, layout))
        except BaseException:
            self.close()
            raise
        self._write_through = [i for i, t in enumerate(self.backing) if t.write_through]
        rows = self.host.slab.rows if self.host else 0
        self._row_layer = np.full(rows, -1, dtype=np.int64)
        self._row_pid = np.full(rows, -1, dtype=np.int64)
        self._row_stamp = np.zeros(rows, dtype=np.int64)
        self._stamp = 0
        # Host copies of residency.host_row, and which backing tiers hold each block (bit i:
        # self.backing[i]): (layers, pids).
        self._rows = np.full((layers, 0), -1, dtype=np.int64)
        self._held = np.zeros((layers, 0), dtype=np.uint8)
        # Open blocks that also have a host row (``open_in_host``): never demoted.
        self._open = np.zeros((layers, 0), dtype=bool)
        self._open_rows = 0
        self._below = [0] * layers  # blocks of each layer held below host memory only
        self._stats = TierStats()

    # ------------------------------------------------------------------ sizes

    @property
    def slots(self) -> int:
        """Device slots per layer."""
        return self.slab.slots

    def reserve(self, pid_capacity: int) -> None:
        """Make room for pids below ``pid_capacity``."""
        self.residency.grow(pid_capacity)
        cap = self.residency.pid_capacity
        if cap > self._rows.shape[1]:
            grow = cap - self._rows.shape[1]
            self._rows = np.pad(self._rows, ((0, 0), (0, grow)), constant_values=-1)
            self._held = np.pad(self._held, ((0, 0), (0, grow)))
            self._open = np.pad(self._open, ((0, 0), (0, grow)))

    def layer_slab(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s slots ``(slots + 1, block_tokens, 2, kv_heads, head_dim)`` (a view)."""
        return self.residency.layer_kv[layer]

    # ------------------------------------------------------------------ the step's reads

    def holds_below_host(self, layer: int) -> bool:
        """Whether some block of ``layer`` is held only below host memory (disk, remote)."""
        return self._below[layer] > 0

    def fetch(self, layer: int, pids: torch.Tensor) -> None:
        """Bring the blocks of ``pids`` of ``layer`` held only below host memory into host memory
        (a host sync and a wait, counted in ``TierStats.disk_waits``)."""
        self._load_from_backing(layer, pids)

    def resident(self, layer: int, pids: torch.Tensor) -> torch.Tensor:
        """Device slots ``(n,)`` holding ``pids`` ``(n,)`` (distinct, ``n <=
        residency.free_slots(layer)``) of ``layer`` (``Residency.resident``). No host sync
        unless the layer has blocks held only below host memory: those are read into host
        memory first, and the step waits (``TierStats.disk_waits``)."""
        if self._below[layer]:
            self.fetch(layer, pids)
        return self.residency.resident(layer, pids)

    # ------------------------------------------------------------------ the write path

    def open(self, layer: int, pids: torch.Tensor) -> torch.Tensor:
        """Pinned device slots ``(n,)`` for new blocks ``pids`` of ``layer`` (open or sink
        blocks); the caller writes their data."""
        return self.residency.claim(layer, pids, pin=True)

    def open_in_host(self, layer: int, pids: np.ndarray) -> torch.Tensor:
        """Host rows ``(n,)`` (a device tensor) for open blocks ``pids`` of ``layer``, so that the
        caller writes their tokens there too as they arrive: each block's row if it has one (a
        sealed block opened again), else a new one. They stay in host memory until sealed or
        freed (``seal`` writes them anew). Needs a host tier of raw rows."""
        rows = self._rows[layer, pids]
        new = np.flatnonzero(rows < 0)
        if len(new):
            taken = self._host_rows(len(new), protect=frozenset((layer, int(p)) for p in pids))
            self._place(layer, pids[new], taken)
            rows[new] = taken
        self._open_rows += int(np.count_nonzero(~self._open[layer, pids]))
        self._open[layer, pids] = True
        return torch.from_numpy(rows).to(self.device)

    def copy(self, layer: int, slots: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        """Pinned device slots ``(n,)`` for new blocks ``pids`` of ``layer`` holding copies of the
        blocks in device ``slots`` (copy-on-write of an open block that rows shared); the bytes
        count as ``moved_bytes["device->device"]``."""
        new = self.open(layer, pids)
        slab = self.layer_slab(layer)
        slab[new] = slab[slots]
        self._add_moved("device->device", pids.numel() * self.layout.nbytes)
        return new

    def place_sealed(self, layer: int, pids: np.ndarray, kv: torch.Tensor, pin: int, blocks: int) -> None:
        """Put sealed blocks on the device too (they are already in host memory: ``seal``):
        ``pids`` ``(rows, n)``, ``kv`` ``(rows * n, block_tokens, 2, kv_heads, head_dim)``. The
        first ``pin`` of each row go to pinned slots (sink blocks; every block without a host
        tier); all ``n`` go (evictable) while every row's ``blocks`` blocks after this write, plus
        an open one, fit the device, so that reads only look slots up (``Residency.read_plan``);
        otherwise only the pinned ones, and ``all_on_device`` ends."""
        rows, n = pids.shape
        placed = n if self.residency.fits(rows, blocks + 1) else pin
        self.residency.all_on_device &= placed == n
        if placed:
            device_pids = torch.from_numpy(pids[:, :placed].reshape(-1)).to(self.device)
            slots = self.residency.claim(layer, device_pids, pin=placed == pin)
            self.layer_slab(layer)[slots] = kv.reshape(rows, n, *kv.shape[1:])[:, :placed].reshape(-1, *kv.shape[1:])

    def pin(self, layer: int, pids: torch.Tensor) -> torch.Tensor:
        """Bring ``pids`` of ``layer`` to the device and pin them there; returns their slots."""
        if pids.numel() > self.residency.free_slots(layer):
            raise CapacityError(f"layer {layer}: cannot pin {pids.numel()} more blocks, "
                                f"{self.residency.free_slots(layer)} device slots free")
        slots = self.resident(layer, pids)
        self.residency.pin(layer, slots)
        return slots

    def unpin(self, layer: int, slots: torch.Tensor) -> None:
        """Make pinned ``slots`` of ``layer`` evictable again."""
        self.residency.unpin(layer, slots)

    def seal(self, layer: int, pids: np.ndarray, kv: torch.Tensor) -> None:
        """Write sealed blocks ``pids`` of ``layer`` (``kv`` ``(n, block_tokens, 2, kv_heads,
        head_dim)``, the slab's layout) through to host memory, moving the oldest host blocks to
        the first backing tier if it is full, and to every write-through tier.
        Without a host tier the blocks must stay pinned on the device (the caller keeps them)."""
        if self.host is None or not len(pids):
            return
        if self._open[layer, pids].all():
            # Open blocks written to host memory as they filled (``open_in_host``): they are
            # there whole already; only copies in the tiers below are stale.
            self._open[layer, pids] = False
            self._open_rows -= len(pids)
            self._forget_below(np.full(len(pids), layer), pids)
            self._write_through_to(layer, pids, kv)
            self._add_moved("device->host", len(pids) * self.host.row_nbytes)
            return
        self._drop_stale(layer, pids)
        self._write_through_to(layer, pids, kv)
        # More blocks than host rows (a long prefill beside a small host budget) pass through in
        # chunks, the earlier ones moving on to disk (open blocks' rows stay).
        step = self.host.slab.rows - self._open_rows
        if step < 1:
            raise CapacityError(f"host tier: its {self.host.slab.rows} rows all hold open blocks; raise "
                                "host_budget_bytes")
        for a in range(0, len(pids), step):
            rows = self._host_rows(len(pids[a : a + step]))
            self.host.write(rows, kv[a : a + step])
            self._place(layer, pids[a : a + step], rows)
        self._add_moved("device->host", len(pids) * self.host.row_nbytes)
        self._note(TierName.HOST, self.host.used_bytes)

    def _write_through_to(self, layer: int, pids: np.ndarray, kv: torch.Tensor) -> None:
        """Copy sealed blocks to the write-through tiers (one batch each)."""
        if not self._write_through:
            return
        keys = [BlockKey(0, layer, int(p)) for p in pids]
        blocks = kv.permute(0, 2, 3, 1, 4)
        for i in self._write_through:
            tier = self.backing[i]
            sizes = tier.write_many(keys, blocks, [self.layout.block_tokens] * len(keys))
            self._held[layer, pids] |= np.uint8(1 << i)
            self._add_moved(f"device->{tier.name.value}", sum(sizes))
            self._note(tier.name, tier.used_bytes)

    def keeps_sealed_blocks_pinned(self) -> bool:
        """True when there is no host tier: sealed blocks cannot leave the device."""
        return self.host is None

    def _place(self, layer: int, pids, rows: np.ndarray) -> None:
        """Record that host ``rows`` now hold blocks ``pids`` of ``layer``."""
        self._row_layer[rows], self._row_pid[rows] = layer, pids
        self._row_stamp[rows] = self._stamp
        self._stamp += 1
        self._rows[layer, pids] = rows
        self.residency.host_row[layer, torch.as_tensor(pids, device=self.device)] = (
            torch.from_numpy(rows).to(self.device))

    def _drop_stale(self, layer: int, pids: np.ndarray) -> None:
        """A block sealed again (reopened after a cut) replaces its host, backing and unpinned
        device copies."""
        self._forget(np.full(len(pids), layer), pids)
        self.residency.drop_stale(layer, torch.from_numpy(np.asarray(pids)).to(self.device))

    def _forget(self, layers: np.ndarray, pids: np.ndarray) -> None:
        """Free the host rows and backing copies of blocks (``layers[i]``, ``pids[i]``)."""
        rows = self._rows[layers, pids]
        in_host = rows >= 0
        self._open_rows -= int(np.count_nonzero(self._open[layers, pids]))
        self._open[layers, pids] = False
        if in_host.any():
            self.host.slab.free(rows[in_host])
            self._row_layer[rows[in_host]] = -1
            self._rows[layers[in_host], pids[in_host]] = -1
        self._forget_below(layers, pids, in_host)

    def _forget_below(self, layers: np.ndarray, pids: np.ndarray, in_host: np.ndarray | None = None) -> None:
        """Drop the backing tiers' copies of blocks (``layers[i]``, ``pids[i]``); ``in_host``: which
        of them host memory holds (default: all), the others leave the below-host counts."""
        in_host = np.ones(len(pids), dtype=bool) if in_host is None else in_host
        held = self._held[layers, pids]
        for i, tier in enumerate(self.backing):
            mine = (held >> i) & 1 == 1
            if mine.any():
                tier.remove_many([BlockKey(0, layer, pid) for layer, pid in zip(layers[mine].tolist(),
                                                                                pids[mine].tolist())])
        for layer in layers[(held > 0) & ~in_host].tolist():
            self._below[layer] -= 1
        self._held[layers, pids] = 0

    def _host_rows(self, n: int, protect: frozenset[tuple[int, int]] = frozenset()) -> np.ndarray:
        """``n`` free host rows, demoting the oldest blocks (not in ``protect``) to the first
        backing tier if needed."""
        short = n - self.host.slab.num_free
        if short > 0:
            if not self.backing:
                raise CapacityError(
                    f"host tier is full ({self.host.capacity_bytes} bytes) and there is no disk tier (or "
                    f"remote tier) to take {short} more blocks; raise host_budget_bytes, or set "
                    "disk_budget_bytes and disk_path (or remote_url and remote_budget_bytes)"
                )
            used = np.flatnonzero(self._row_layer >= 0)
            used = used[~self._open[self._row_layer[used], self._row_pid[used]]]
            order = used[np.argsort(self._row_stamp[used], kind="stable")]
            victims = [r for r in order.tolist()
                       if (int(self._row_layer[r]), int(self._row_pid[r])) not in protect][:short]
            if len(victims) < short:
                raise CapacityError(f"host tier: {short} blocks must stay in host memory for this step, "
                                    f"only {len(victims)} can move below it; raise host_budget_bytes")
            self._demote(np.array(victims, dtype=np.int64))
        return self.host.slab.alloc(n)

    def _demote(self, rows: np.ndarray) -> None:
        """Move host ``rows`` below host memory, to the first backing tier (blocks it holds
        already, written through or demoted before, are not written again)."""
        layers, pids = self._row_layer[rows], self._row_pid[rows]
        new = np.flatnonzero(self._held[layers, pids] & 1 == 0)
        if len(new):
            tier = self.backing[0]
            kv = self.host.read(torch.from_numpy(rows[new])).permute(0, 2, 3, 1, 4)
            keys = [BlockKey(0, int(layers[i]), int(pids[i])) for i in new]
            sizes = tier.write_many(keys, kv, [self.layout.block_tokens] * len(new))
            self._held[layers[new], pids[new]] |= np.uint8(1)
            self._add_moved(f"host->{tier.name.value}", sum(sizes))
            self._note(tier.name, tier.used_bytes)
        self._rows[layers, pids] = -1
        for layer in layers.tolist():
            self._below[layer] += 1
        self.residency.host_row[torch.from_numpy(layers).to(self.device),
                                torch.from_numpy(pids).to(self.device)] = self.host.slab.scratch
        self._row_layer[rows] = -1
        self.host.slab.free(rows)
        self._stats.demotions += len(rows)

    def _load_from_backing(self, layer: int, pids: torch.Tensor) -> None:
        """Read the blocks of ``pids`` held only below host memory into host memory (a sync and a
        wait)."""
        start = time.perf_counter()
        wanted = np.unique(pids.cpu().numpy())
        need = wanted[(self._held[layer, wanted] > 0) & (self._rows[layer, wanted] < 0)]
        if len(need):
            on_device = self.residency.device_slot[layer, torch.from_numpy(need).to(self.device)] >= 0
            need = need[~on_device.cpu().numpy()]
        if not len(need):
            return
        kv = self._read_backing(layer, need, counted=True).permute(0, 3, 1, 2, 4)
        rows = self._host_rows(len(need), protect=frozenset((layer, int(p)) for p in wanted))
        self.host.write(rows, kv)
        self._place(layer, need, rows)
        self._below[layer] -= len(need)
        self._stats.disk_waits += 1
        self._stats.wait_seconds += time.perf_counter() - start

    def _read_backing(self, layer: int, pids: np.ndarray, counted: bool = False) -> torch.Tensor:
        """Blocks ``pids`` of ``layer``, each from the first backing tier holding it, as ``(n, 2,
        kv_heads, block_tokens, head_dim)``; ``counted``: count them as that tier's hits."""
        lay = self.layout
        out = torch.empty((len(pids), 2, *lay.shape), dtype=lay.dtype, device=self.device)
        held = self._held[layer, pids]
        todo = np.ones(len(pids), dtype=bool)
        for i, tier in enumerate(self.backing):
            mine = np.flatnonzero(todo & ((held >> i) & 1 == 1))
            if not len(mine):
                continue
            keys = [BlockKey(0, layer, int(pids[j])) for j in mine]
            out[mine.tolist()] = tier.read_many(keys, [lay.block_tokens] * len(mine), self.device)
            todo[mine] = False
            if counted:
                self._stats.hits[tier.name.value] += len(mine)
                self._add_moved(f"{tier.name.value}->host", len(mine) * self.host.row_nbytes)
        return out

    # ------------------------------------------------------------------ whole blocks

    def read(self, layer: int, pids: np.ndarray, wait: bool = False) -> torch.Tensor:
        """Blocks ``pids`` of ``layer`` as ``(n, block_tokens, 2, kv_heads, head_dim)`` on the
        device, from whichever tier holds each, leaving every tier as it is (for export, the token
        index, and a step whose tokens lie below host memory; ``wait``: count it as a step that
        waited for a backing tier, ``TierStats.disk_waits``)."""
        start = time.perf_counter()
        lay = self.layout
        out = torch.empty((len(pids), lay.block_tokens, 2, lay.kv_heads, lay.head_dim), dtype=lay.dtype,
                          device=self.device)
        index = torch.from_numpy(np.asarray(pids, dtype=np.int64)).to(self.device)
        slots = self.residency.device_slot[layer, index].cpu().numpy()
        rows = self._rows[layer, pids]
        on_device = np.flatnonzero(slots >= 0)
        host = np.flatnonzero((slots < 0) & (rows >= 0)).tolist()
        below = np.flatnonzero((slots < 0) & (rows < 0))
        if len(on_device):
            out[on_device.tolist()] = self.slab.kv[layer, torch.from_numpy(slots[on_device]).to(self.device)]
        if host:
            out[host] = self.host.read(torch.from_numpy(rows[host]).to(self.device))
        if len(below):
            out[below.tolist()] = self._read_backing(layer, np.asarray(pids)[below], counted=wait).permute(0, 3, 1, 2, 4)
            if wait:
                self._stats.disk_waits += 1
                self._stats.wait_seconds += time.perf_counter() - start
        return out

    def free(self, pids: np.ndarray) -> None:
        """Delete blocks ``pids`` of every layer from every tier."""
        if not len(pids):
            return
        self._note_device()
        pids = np.asarray(pids, dtype=np.int64)
        self.residency.forget(torch.from_numpy(pids).to(self.device))
        layers = np.repeat(np.arange(self.layers), len(pids))
        self._forget(layers, np.tile(pids, self.layers))

    # ------------------------------------------------------------------ statistics

    @property
    def disk(self) -> BackingTier | None:
        """The disk tier, if there is one."""
        return self._backing_tier(TierName.DISK)

    @property
    def remote(self) -> BackingTier | None:
        """The remote (Redis) tier, if there is one."""
        return self._backing_tier(TierName.REMOTE)

    def _backing_tier(self, name: TierName) -> BackingTier | None:
        return next((t for t in self.backing if t.name is name), None)

    def used_bytes(self, tier: TierName) -> int:
        """Bytes ``tier`` holds now (raw bytes of occupied slots on the device)."""
        if tier is TierName.DEVICE:
            return int((self.residency.slot_pid >= 0).sum()) * self.layout.nbytes
        if tier is TierName.HOST:
            return self.host.used_bytes if self.host else 0
        backing = self._backing_tier(tier)
        return backing.used_bytes if backing else 0

    def block_counts(self) -> dict[str, int]:
        """Blocks each tier holds now (a block may be in several: device copies are clean, a
        block read back from a backing tier keeps its copy there, and a write-through tier holds
        every sealed block)."""
        counts = {TierName.DEVICE.value: int((self.residency.slot_pid[:, : self.slots] >= 0).sum()),
                  TierName.HOST.value: self.host.slab.used_rows if self.host else 0}
        for tier in (TierName.DISK, TierName.REMOTE):
            i = next((i for i, t in enumerate(self.backing) if t.name is tier), None)
            counts[tier.value] = 0 if i is None else int(((self._held >> i) & 1).sum())
        return counts

    def capacity_bytes(self, tier: TierName) -> int:
        """Bytes ``tier`` may hold: its budget rounded down to whole blocks."""
        if tier is TierName.DEVICE:
            return self.slab.capacity_bytes
        if tier is TierName.HOST:
            return self.host.capacity_bytes if self.host else 0
        backing = self._backing_tier(tier)
        return backing.capacity_bytes if backing else 0

    def stats(self) -> TierStats:
        """A snapshot of the counters (reads the device counters: one sync)."""
        s = self._stats.copy()
        s.lookups = self.residency.lookups
        misses = int(self.residency.device_misses)
        s.hits[TierName.DEVICE.value] = s.lookups - misses
        s.hits[TierName.HOST.value] = misses - sum(s.hits[t.name.value] for t in self.backing)
        s.tokens_read = self.residency.token_reads
        s.tokens_from_host = self.residency.host_token_reads
        if self.host is not None:
            token_nbytes = 2 * self.layout.head_dim * self.layout.dtype.itemsize
            s.moved_bytes["host->device"] = misses * self.layout.nbytes + s.tokens_from_host * token_nbytes
        self._note_device()
        s.peak_bytes = dict(self._stats.peak_bytes)
        return s

    def _note_device(self) -> None:
        self._note(TierName.DEVICE, self.used_bytes(TierName.DEVICE))

    def _note(self, tier: TierName, used: int) -> None:
        if used > self._stats.peak_bytes[tier.value]:
            self._stats.peak_bytes[tier.value] = used

    def _add_moved(self, what: str, nbytes: int) -> None:
        self._stats.moved_bytes[what] = self._stats.moved_bytes.get(what, 0) + nbytes

    def close(self) -> None:
        """Close the backing tiers (the disk store checkpoints and releases its writer lock; the
        remote tier removes its blocks). Idempotent."""
        for tier in self.backing:
            tier.close()

    def __enter__(self) -> "TierManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
