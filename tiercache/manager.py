"""``TierManager``: the block table and the movement of blocks between tiers.

Tiers form a chain, fastest first: the device pool (level 0), then the backing tiers (host, then
disk when configured). A block lives in exactly one tier. ``get`` and ``promote`` bring blocks to
the device; making room demotes the policy's victims one level down, cascading when the level
below is full. A request that cannot be placed raises ``CapacityError`` *before* anything moves,
so no stored block is ever lost to a full tier.

Thread safety: one re-entrant lock guards the table, the pools and the tiers. ``prefetch`` runs
promotions on a worker thread (on its own CUDA stream when the device is a GPU, synchronised
before the lock is released, so a reader never sees a half-copied slot); ``get`` waits only for
the prefetches of the blocks it asked for.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch

from .blocks import BlockKey, BlockLayout, BlockMeta, TierName
from .config import TierConfig
from .errors import BlockNotFoundError, CapacityError, PinnedBlockError, ShapeError, TiercacheError
from .io.codec import make_codec
from .policy import Policy, make_policy
from .pools import DevicePool
from .tiers import BackingTier, HostTier


@dataclass
class TierStats:
    """Counters since the manager was created. Blocks are counted in blocks, sizes in bytes of the
    encoding of the tier they were written to, times in seconds.

    Invariants: ``lookups == sum(hits.values())``; ``device_misses == lookups - hits["device"]``.
    ``moved_bytes`` is keyed ``"src->dst"`` (e.g. ``"host->device"``).
    """

    lookups: int = 0
    hits: dict[str, int] = field(default_factory=lambda: {t.value: 0 for t in TierName})
    puts: int = 0
    promotions: int = 0
    demotions: int = 0
    prefetch_requested: int = 0
    prefetched: int = 0
    prefetch_failed: int = 0
    moved_bytes: Counter = field(default_factory=Counter)
    wait_seconds: float = 0.0
    peak_bytes: dict[str, int] = field(default_factory=lambda: {t.value: 0 for t in TierName})

    @property
    def device_misses(self) -> int:
        """Blocks that ``get`` had to bring to the device (not resident when asked for)."""
        return self.lookups - self.hits[TierName.DEVICE.value]

    def copy(self) -> "TierStats":
        return replace(self, hits=dict(self.hits), moved_bytes=Counter(self.moved_bytes),
                       peak_bytes=dict(self.peak_bytes))


def default_lower_tiers(config: TierConfig, layout: BlockLayout) -> list[BackingTier]:
    """The backing tiers a config asks for: host (if its budget holds a block), then disk."""
    tiers: list[BackingTier] = []
    if config.host_budget_bytes > 0:
        host = HostTier(layout, config.host_budget_bytes, make_codec(config.host_codec, **config.host_codec_params))
        if host.pool.num_slots > 0:
            tiers.append(host)
    if config.disk_budget_bytes > 0:
        from .io.disk import DiskTier

        tiers.append(DiskTier.from_config(config, layout))
    return tiers


class TierManager:
    """Places blocks of ``layout`` in the device pool and the backing tiers within their budgets.

    ``lower_tiers`` overrides the backing tiers built from ``config`` (for tests and custom tiers).
    """

    def __init__(self, config: TierConfig, layout: BlockLayout,
                 lower_tiers: Sequence[BackingTier] | None = None) -> None:
        config.check_budgets(layout)
        self.config = config
        self.layout = layout
        self.device = torch.device(config.device)
        self.pool = DevicePool(layout, config.device_budget_bytes, self.device)
        self.lower: list[BackingTier] = list(default_lower_tiers(config, layout) if lower_tiers is None else lower_tiers)
        #: Tiers this manager built from ``config`` (closed by ``close``); tiers passed in as
        #: ``lower_tiers`` belong to the caller.
        self._owned: list[BackingTier] = list(self.lower) if lower_tiers is None else []
        self._levels: list[TierName] = [TierName.DEVICE] + [t.name for t in self.lower]
        self._policies: list[Policy] = [make_policy(config.policy)] + [make_policy("lru") for _ in self.lower]
        self._table: dict[BlockKey, BlockMeta] = {}
        self._seqs: dict[int, set[BlockKey]] = {}
        self._lock = threading.RLock()
        self._pending: dict[BlockKey, Future] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._stats = TierStats()

    # ----------------------------------------------------------------- queries

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __len__(self) -> int:
        return len(self._table)

    def meta(self, key: BlockKey) -> BlockMeta:
        """A copy of the table entry of ``key``; ``BlockNotFoundError`` if unknown."""
        with self._lock:
            return replace(self._entry(key))

    def keys(self, seq: int | None = None) -> list[BlockKey]:
        """All block keys, or those of sequence ``seq``, sorted."""
        with self._lock:
            return sorted(self._table if seq is None else self._seqs.get(seq, ()))

    def used_bytes(self, tier: TierName) -> int:
        """Bytes held now by ``tier`` (raw bytes of occupied slots on the device)."""
        with self._lock:
            if tier is TierName.DEVICE:
                return (self.pool.num_slots - self.pool.num_free) * self.pool.slot_nbytes
            return self._lower_tier(tier).used_bytes

    def capacity_bytes(self, tier: TierName) -> int:
        """Bytes ``tier`` may hold: its budget rounded down to whole slots."""
        if tier is TierName.DEVICE:
            return self.pool.num_slots * self.pool.slot_nbytes
        return self._lower_tier(tier).capacity_bytes

    def max_get_blocks(self) -> int:
        """Most blocks one ``get`` can return: device slots not held by pinned blocks."""
        with self._lock:
            return self.pool.num_free + len(self._policies[0])

    def stats(self) -> TierStats:
        """A snapshot of the counters."""
        with self._lock:
            return self._stats.copy()

    # ----------------------------------------------------------------- writes

    def put(self, key: BlockKey, k: torch.Tensor, v: torch.Tensor, pinned: bool = False) -> None:
        """Write block ``key`` (keys and values ``(kv_heads, tokens, head_dim)``, ``tokens <=
        block_tokens``) to the device tier, replacing any earlier content of the key."""
        tokens = self.layout.check(k, v, what=f"put {key}")
        with self._lock:
            meta = self._table.get(key)
            if meta is None or meta.tier is not TierName.DEVICE:
                level = self._level(meta.tier) if meta else None
                self._check_room(1, leaving={level: 1} if meta else None)
                if meta:  # the old content is replaced: drop it from its lower tier
                    self._release(level, key)
                slot = self._alloc_device(1, exclude=())[0]
                meta = BlockMeta(key, tokens, TierName.DEVICE, slot, pinned, self.pool.slot_nbytes)
                self._table[key] = meta
                self._seqs.setdefault(key.seq, set()).add(key)
            meta.tokens, meta.pinned = tokens, pinned
            self.pool.slab[meta.slot, 0, :, :tokens] = k
            self.pool.slab[meta.slot, 1, :, :tokens] = v
            self._track_device(key, pinned)
            self._stats.puts += 1
            self._note_peak(TierName.DEVICE)

    def append(self, key: BlockKey, k: torch.Tensor, v: torch.Tensor) -> int:
        """Append tokens (``(kv_heads, t, head_dim)``) to block ``key`` in place; return its new
        number of tokens. The block must be on the device (open blocks are pinned there) and have
        room for ``t`` more tokens."""
        with self._lock:
            meta = self._entry(key)
            if meta.tier is not TierName.DEVICE:
                raise PinnedBlockError(f"append to {key}: the block is in the {meta.tier.value} tier; "
                                       "open blocks must stay pinned on the device")
            t = self.layout.check(k, v, what=f"append to {key}")
            end = meta.tokens + t
            if end > self.layout.block_tokens:
                raise ShapeError(f"append to {key}: {meta.tokens} + {t} tokens exceed the block's "
                                 f"{self.layout.block_tokens}")
            self.pool.slab[meta.slot, 0, :, meta.tokens:end] = k
            self.pool.slab[meta.slot, 1, :, meta.tokens:end] = v
            meta.tokens = end
            return end

    def pin(self, keys: Iterable[BlockKey]) -> None:
        """Pin blocks to the device (bringing them there first): they are never evicted."""
        keys = list(keys)
        self._wait_for(keys)
        with self._lock:
            self._promote(keys)
            for key in keys:
                self._entry(key).pinned = True
                self._policies[0].remove(key)

    def unpin(self, keys: Iterable[BlockKey]) -> None:
        """Make pinned blocks evictable again."""
        with self._lock:
            for key in keys:
                meta = self._entry(key)
                if meta.pinned:
                    meta.pinned = False
                    self._policies[0].insert(key)

    def drop(self, seq: int) -> int:
        """Delete every block of sequence ``seq`` from every tier; return how many were dropped."""
        with self._lock:
            keys = self._seqs.pop(seq, set())
            for key in keys:
                meta = self._table.pop(key)
                level = self._level(meta.tier)
                self._policies[level].remove(key)
                if level == 0:
                    self.pool.free(meta.slot)
                else:
                    self._lower_tier(meta.tier).remove(key)
            return len(keys)

    def remove(self, keys: Iterable[BlockKey]) -> None:
        """Delete blocks from whichever tier holds them."""
        keys = list(keys)
        self._wait_for(keys)
        with self._lock:
            for key in keys:
                meta = self._entry(key)
                self._release(self._level(meta.tier), key)
                del self._table[key]
                self._seqs[key.seq].discard(key)

    def record_selection(self, keys: Iterable[BlockKey]) -> None:
        """Tell the device policy which blocks retrieval chose this step (the score policy keeps
        them hot)."""
        with self._lock:
            self._policies[0].record_selection(keys)

    # ----------------------------------------------------------------- movement

    def get(self, keys: Sequence[BlockKey]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``keys``, each ``(n, kv_heads, block_tokens, head_dim)`` on the
        device, gathered in order (positions past a block's ``tokens`` are unspecified).

        Blocks not on the device are brought there, evicting by policy; waits only for the
        prefetches of these keys.
        """
        keys = list(keys)
        start = time.perf_counter()
        self._wait_for(keys)
        with self._lock:
            sources = [self._entry(key).tier.value for key in keys]
            self._promote(keys)
            self._stats.lookups += len(keys)
            for tier in sources:
                self._stats.hits[tier] += 1
            slots = torch.tensor([self._table[key].slot for key in keys], dtype=torch.long, device=self.device)
            kv = self.pool.slab.index_select(0, slots)
            for key in keys:
                self._policies[0].touch(key)
            self._stats.wait_seconds += time.perf_counter() - start
        return kv[:, 0], kv[:, 1]

    def tokens(self, keys: Sequence[BlockKey]) -> list[int]:
        """Number of valid tokens of each block."""
        with self._lock:
            return [self._entry(key).tokens for key in keys]

    def promote(self, keys: Iterable[BlockKey]) -> None:
        """Bring blocks to the device now (synchronously)."""
        keys = list(keys)
        self._wait_for(keys)
        with self._lock:
            self._promote(keys)

    def prefetch(self, keys: Iterable[BlockKey]) -> Future:
        """Start bringing blocks to the device in the background; return a future that completes
        when they are there. Unknown keys raise ``BlockNotFoundError`` now; a prefetch that cannot
        find room gives up quietly (counted in ``stats().prefetch_failed``): ``get`` then fetches
        what it needs itself."""
        with self._lock:
            todo = [k for k in dict.fromkeys(keys) if self._entry(k).tier is not TierName.DEVICE
                    and k not in self._pending]
            self._stats.prefetch_requested += len(todo)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="tiercache-prefetch")
            future = self._executor.submit(self._prefetch_task, todo)
            for key in todo:
                self._pending[key] = future
        return future

    def demote(self, keys: Iterable[BlockKey]) -> None:
        """Move blocks one tier down (device to host, host to disk), making room below as needed."""
        keys = list(dict.fromkeys(keys))
        self._wait_for(keys)
        with self._lock:
            by_level: dict[int, list[BlockKey]] = {}
            for key in keys:
                meta = self._entry(key)
                if meta.pinned:
                    raise PinnedBlockError(f"{key} is pinned to the device; unpin it before demoting")
                if self._level(meta.tier) == len(self._levels) - 1:
                    raise CapacityError(f"{key} is in the lowest tier ({meta.tier.value}); nothing is below it")
                by_level.setdefault(self._level(meta.tier), []).append(key)
            for level in sorted(by_level, reverse=True):  # bottom first, so upper moves find room
                self._check_room(len(by_level[level]), start=level + 1, exclude=set(keys))
                self._demote(level, by_level[level], exclude=set(keys))

    def evict(self, n: int = 1) -> list[BlockKey]:
        """Demote ``n`` device blocks chosen by the policy; return their keys."""
        with self._lock:
            victims = self._policies[0].victims(n)
            self._check_room(n, start=1)
            self._demote(0, victims, exclude=set(victims))
            return victims

    def close(self) -> None:
        """Wait for running prefetches, stop the worker thread and close every tier this manager
        built (the disk tier's store checkpoints and releases its writer lock). Idempotent."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        owned, self._owned = self._owned, []
        for tier in owned:
            close = getattr(tier, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> "TierManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    def _entry(self, key: BlockKey) -> BlockMeta:
        meta = self._table.get(key)
        if meta is None:
            raise BlockNotFoundError(f"{key} is not stored in any tier")
        return meta

    def _level(self, tier: TierName) -> int:
        return self._levels.index(tier)

    def _lower_tier(self, tier: TierName) -> BackingTier:
        level = self._levels.index(tier) if tier in self._levels else 0
        if level == 0:
            raise TiercacheError(f"tier {tier.value!r} is not configured below the device")
        return self.lower[level - 1]

    def _free_blocks(self, level: int) -> int:
        return self.pool.num_free if level == 0 else self.lower[level - 1].free_blocks()

    def _check_room(self, n: int, start: int = 0, leaving: dict[int, int] | None = None,
                    exclude: set[BlockKey] = frozenset()) -> None:
        """Raise ``CapacityError`` unless ``n`` blocks can be placed at level ``start`` by cascading
        demotions, given ``leaving[level]`` blocks that leave that level first. Moves nothing."""
        if start == len(self._levels):
            raise CapacityError(f"{self._levels[-1].value} is the lowest tier; there is nothing below it")
        leaving = leaving or {}
        need = n - self._free_blocks(start) - leaving.get(start, 0)
        level = start
        while need > 0:
            policy = self._policies[level]
            evictable = len(policy) - leaving.get(level, 0) - sum(1 for k in exclude if k in policy)
            name = self._levels[level].value
            if evictable < need:
                raise CapacityError(
                    f"{name} tier is full: {need} more blocks needed, only {evictable} can be evicted "
                    f"(the rest are pinned or in use); raise device_budget_bytes"
                )
            if level + 1 == len(self._levels):
                raise CapacityError(
                    f"{name} tier is full and there is no tier below it to take {need} blocks; "
                    f"raise host_budget_bytes or disk_budget_bytes"
                )
            level += 1
            need = need - self._free_blocks(level) - leaving.get(level, 0)

    def _alloc_device(self, n: int, exclude: Iterable[BlockKey]) -> list[int]:
        deficit = n - self.pool.num_free
        if deficit > 0:
            exclude = set(exclude)
            self._demote(0, self._policies[0].victims(deficit, exclude), exclude)
        return [self.pool.alloc() for _ in range(n)]

    def _read(self, level: int, keys: list[BlockKey], device: torch.device) -> torch.Tensor:
        """Blocks ``keys`` of ``level`` as ``(n, 2, kv_heads, block_tokens, head_dim)`` on ``device``."""
        if level == 0:
            slots = torch.tensor([self._table[k].slot for k in keys], dtype=torch.long, device=self.device)
            return self.pool.slab.index_select(0, slots)
        return self.lower[level - 1].read_many(keys, [self._table[k].tokens for k in keys], device)

    def _release(self, level: int, key: BlockKey) -> None:
        self._policies[level].remove(key)
        if level == 0:
            self.pool.free(self._table[key].slot)
        else:
            self.lower[level - 1].remove(key)

    def _demote(self, level: int, keys: list[BlockKey], exclude: set[BlockKey]) -> None:
        """Move ``keys`` from ``level`` to ``level + 1``, first demoting victims there if full."""
        target = self.lower[level]
        deficit = len(keys) - target.free_blocks()
        if deficit > 0:
            self._demote(level + 1, self._policies[level + 1].victims(deficit, exclude), exclude)
        kv = self._read(level, keys, self.device if level == 0 else torch.device("cpu"))
        sizes = target.write_many(keys, kv, [self._table[k].tokens for k in keys])
        for key, size in zip(keys, sizes):
            self._release(level, key)
            meta = self._table[key]
            meta.tier, meta.slot, meta.stored_nbytes = target.name, -1, size
            self._policies[level + 1].insert(key)
        self._stats.demotions += len(keys)
        self._stats.moved_bytes[f"{self._levels[level].value}->{target.name.value}"] += sum(sizes)
        self._note_peak(target.name)

    def _promote(self, keys: Sequence[BlockKey]) -> int:
        """Make ``keys`` resident on the device; return how many had to move."""
        by_level: dict[int, list[BlockKey]] = {}
        for key in dict.fromkeys(keys):
            level = self._level(self._entry(key).tier)
            if level:
                by_level.setdefault(level, []).append(key)
        missing = [k for level in sorted(by_level) for k in by_level[level]]
        if not missing:
            return 0
        resident = {k for k in keys if self._table[k].tier is TierName.DEVICE}
        self._check_room(len(missing), leaving={lvl: len(ks) for lvl, ks in by_level.items()}, exclude=resident)
        # Read everything first and only then free the source slots, so the demotions that make
        # room on the device can reuse them.
        loaded = {lvl: self._read(lvl, ks, self.device) for lvl, ks in by_level.items()}
        for level, ks in by_level.items():
            for key in ks:
                self._release(level, key)
        slots = self._alloc_device(len(missing), exclude=resident)
        parts = [loaded[lvl] for lvl in sorted(by_level)]
        self.pool.slab.index_copy_(0, torch.tensor(slots, dtype=torch.long, device=self.device),
                                   parts[0] if len(parts) == 1 else torch.cat(parts))
        for key, slot in zip(missing, slots):
            meta = self._table[key]
            source = meta.tier
            self._stats.moved_bytes[f"{source.value}->device"] += meta.stored_nbytes
            meta.tier, meta.slot, meta.stored_nbytes = TierName.DEVICE, slot, self.pool.slot_nbytes
            self._track_device(key, meta.pinned)
        self._stats.promotions += len(missing)
        self._note_peak(TierName.DEVICE)
        return len(missing)

    def _track_device(self, key: BlockKey, pinned: bool) -> None:
        if pinned:
            self._policies[0].remove(key)
        else:
            self._policies[0].insert(key)

    def _note_peak(self, tier: TierName) -> None:
        used = self.used_bytes(tier)
        if used > self._stats.peak_bytes[tier.value]:
            self._stats.peak_bytes[tier.value] = used

    def _wait_for(self, keys: Iterable[BlockKey]) -> None:
        for future in {self._pending[k] for k in keys if k in self._pending}:
            future.result()

    def _prefetch_task(self, keys: list[BlockKey]) -> None:
        stream_ctx = torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()
        with self._lock, stream_ctx:
            try:
                live = [k for k in keys if k in self._table]
                self._stats.prefetched += self._promote(live)
            except CapacityError:
                self._stats.prefetch_failed += len(keys)
            finally:
                if self._stream is not None:
                    # Done before the lock is released: no reader can see a slot mid-copy.
                    self._stream.synchronize()
                for key in keys:
                    self._pending.pop(key, None)
