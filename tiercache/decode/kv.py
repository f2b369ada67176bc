"""``BatchKV``: what a batch has cached, and every change to it.

Per layer: its length in tokens and each row's *open block* (the partial last block, pinned in a
device slot and written in place). For every layer at once: the ``BlockTable`` (which physical
block holds each block of each row, and which tokens are real), the ``UnitIndex`` (unit
summaries that retrieval scores) and the ``BlockEstimates`` (each sealed block's mean key and
value, for the layers that estimate what they do not read).

**Writing** (``append``) is the first stage of every step: new tokens fill the open block; a
block that fills is *sealed*: written through to host memory (``TierManager.seal``), estimated,
and unpinned unless it is a sink block; whole blocks of a prefill are sealed at once and also put
on the device while everything fits (``TierManager.place_sealed``); the last partial block
becomes the open block. Units that fill are summarised into the index.

**Between forwards** (host bookkeeping, outside the step's tensor pipeline): ``cut`` forgets the
last tokens (crop, a question asked of a stream) and reopens the block that becomes the last;
``reorder`` makes rows copies of other rows (beam search), sharing their blocks, with
copy-on-write of an open block that rows now share.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import TierConfig
from ..errors import ConfigError, ShapeError
from ..retrieval.estimate import BlockEstimates
from ..retrieval.index import UnitIndex
from ..retrieval.summaries import Summary
from ..retrieval.token_index import TokenIndex
from ..spec import ModelSpec
from ..tiers.manager import TierManager
from .gather import gather_tokens
from .table import BlockTable


class BatchKV:
    """The cached KV of a batch of ``rows`` rows (set by ``start``) of a model of ``spec`` in
    ``memory``'s tiers; units of ``unit_tokens`` tokens summarised by ``summary``; ``estimated``:
    per layer, whether it keeps block estimates."""

    def __init__(self, spec: ModelSpec, config: TierConfig, memory: TierManager, summary: Summary,
                 unit_tokens: int, estimated: tuple[bool, ...]) -> None:
        self.spec = spec
        self.retrieval = config.retrieval
        self.memory = memory
        self.layout = memory.layout
        self.summary = summary
        self.unit = unit_tokens
        self.estimated = estimated
        self.sink_blocks = math.ceil(config.retrieval.sink_tokens / self.layout.block_tokens)
        self.device = memory.device
        self.table: BlockTable | None = None
        # Blocks retrieval (``index="blocks"``) keeps unit summaries and block estimates; token
        # retrieval keeps the token index of its full-attention layers.
        self.index: UnitIndex | None = None
        self.estimates: BlockEstimates | None = None
        self.tokens: TokenIndex | None = None
        self.token_layers = tuple(window is None for window in spec.windows)  # what the token index covers
        self.lengths = [0] * spec.layers
        self.open: list[torch.Tensor | None] = [None] * spec.layers  # each row's open-block slot (rows,)
        # Token retrieval reads every token from host memory (``decode.gather``), the open
        # blocks' too: they are written there as well as to their slots, into these rows (rows,).
        self.open_rows: list[torch.Tensor | None] = [None] * spec.layers
        self.mirror_open = config.retrieval.index == "tokens" and memory.host is not None
        bt = self.layout.block_tokens
        #: Sealed tokens the token index takes at once in decode steps: whole blocks, at most the
        #: window (the tokens not indexed are always read, in the window).
        self.index_tokens = max(bt, config.retrieval.window_tokens // bt * bt)
        self.check_room(1)
        #: Whether some prompt had padding: retrieval then masks units of padding only.
        self.padded = False

    @property
    def rows(self) -> int:
        """Rows of the batch (0 before ``start``)."""
        return self.table.rows if self.table is not None else 0

    def start(self, rows: int) -> None:
        """Size the block table, unit index and estimates for a batch of ``rows`` rows."""
        self.check_room(rows)
        spec, dtype = self.spec, self.layout.dtype
        self.table = BlockTable(rows, self.layout.block_tokens, self.device, dtype)
        r = self.retrieval
        if r.index == "tokens":
            self.tokens = TokenIndex(spec.layers, rows, spec.kv_heads, spec.head_dim, r.segment_tokens, r.run_tokens,
                                     self.device, dtype)
        else:
            # Summaries in the KV dtype: in fp32 they would be half the size of a bf16 cache's keys.
            self.index = UnitIndex(self.summary, spec.layers, rows, spec.kv_heads, spec.head_dim, self.unit,
                                   self.device, dtype)
            self.estimates = BlockEstimates(spec.layers, rows, spec.kv_heads, spec.head_dim, self.device, dtype) \
                if any(self.estimated) else None
        self.padded = False
        # Nothing is cached: every block is on the device until one does not fit.
        self.memory.residency.all_on_device = True

    def reset(self) -> None:
        """Forget every cached token and the batch size."""
        if self.table is not None:
            self.memory.free(self.table.clear())
        self.table = self.index = self.estimates = self.tokens = None
        self.lengths = [0] * self.spec.layers
        self.open = [None] * self.spec.layers
        self.open_rows = [None] * self.spec.layers

    def check_room(self, rows: int) -> None:
        """``ConfigError`` unless every layer's device slots hold each row's sink blocks and open
        block, plus one block per row to stream the rest through."""
        need = rows * (self.sink_blocks + 2)
        memory = self.memory
        if memory.slots < need:
            raise ConfigError(
                f"device_budget_bytes={memory.config.device_budget_bytes} holds {memory.slots} blocks of "
                f"{self.layout.nbytes} bytes per layer ({self.spec.layers} layers); a batch of {rows} needs at least "
                f"{need} per layer ({rows} x ({self.sink_blocks} sink + 1 open + 1 streamed)), i.e. "
                f"{need * self.spec.layers * self.layout.nbytes} bytes"
            )
        if self.mirror_open:
            # Token retrieval keeps every layer's open blocks in host rows, beside the blocks a
            # read of the device's size brings there.
            need = rows * self.spec.layers + memory.slots
            host = memory.host
            if host.slab.rows < need:
                raise ConfigError(
                    f"host_budget_bytes={memory.config.host_budget_bytes} holds {host.slab.rows} blocks of "
                    f"{host.row_nbytes} bytes; token retrieval (retrieval index='tokens') with a batch of {rows} "
                    f"needs at least {need} ({rows} x {self.spec.layers} layers' open blocks + {memory.slots} "
                    f"read through), i.e. {need * host.row_nbytes} bytes; raise host_budget_bytes or use "
                    "index='blocks'")

    def check_settled(self, what: str, pending: bool = False) -> None:
        """``ShapeError`` in the middle of a forward (``pending``, or layers holding different
        numbers of tokens)."""
        if pending or len(set(self.lengths)) != 1:
            raise ShapeError(f"{what}: the cache is in the middle of a forward (layers hold {sorted(set(self.lengths))} "
                             "tokens); call it between forwards")

    # ------------------------------------------------------------------ writing

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Write new keys and values ``(rows, kv_heads, n, head_dim)`` of ``layer`` into its blocks
        (``valid`` ``(rows, n)``: which are real tokens; None: all) and summarise the units they
        complete."""
        rows, _, n, _ = keys.shape
        bt, unit = self.layout.block_tokens, self.unit
        pos, end = self.lengths[layer], self.lengths[layer] + n
        if self.table.tokens < end:  # the first layer to get here grows the rows
            self.table.extend(end, valid)
            self.memory.reserve(self.table.pid_capacity)
            if n > 1 and valid is not None and not self.padded:
                # A sync, in prefill only. Retrieval masks padding once some prompt had it; a
                # decode token of padding is still never attended, only summarised.
                self.padded = bool((~valid).any())
        # (rows, n, 2, kv_heads, head_dim): the slab's token-major layout.
        kv = torch.stack((keys, values), dim=1).permute(0, 3, 1, 2, 4)
        if kv.dtype != self.layout.dtype:
            kv = kv.to(self.layout.dtype)
        slab = self.memory.layer_slab(layer)
        block, offset = divmod(pos, bt)
        # Keys of the units this append completes, with the tokens of the first one cached before.
        unit_start = pos // unit * unit
        done = end // unit - pos // unit
        unit_keys = None
        if done:
            unit_keys = kv[:, : unit_start + done * unit - pos, 0]
            if unit_start < pos:
                carried = slab[self.open[layer], offset - (pos - unit_start) : offset, 0]
                unit_keys = torch.cat([carried, unit_keys], dim=1)
        written = 0
        if offset:  # fill the open block
            written = min(n, bt - offset)
            slab[self.open[layer], offset : offset + written] = kv[:, :written]
            if self.mirror_open:
                self.memory.host.slab.data[self.open_rows[layer], offset : offset + written] = kv[:, :written]
            if offset + written == bt:
                self._seal_open(layer, block)
            block += 1
        full = (n - written) // bt
        if full:
            self._store(layer, block, kv[:, written : written + full * bt].reshape(rows, full, bt, *kv.shape[2:]))
            written += full * bt
            block += full
        if written < n:  # the last, partial block becomes the open block
            slots = self.memory.open(layer, self.device_pids(block))
            slab[slots, : n - written] = kv[:, written:]
            self.open[layer] = slots
            if self.mirror_open:
                self.open_rows[layer] = self.memory.open_in_host(layer, self.table.host_pids(block))
                self.memory.host.slab.data[self.open_rows[layer], : n - written] = kv[:, written:]
        self.lengths[layer] = end
        if self.tokens is not None and self.token_layers[layer]:
            self._index_sealed(layer, force=n > 1)
        if done and self.index is not None:
            self.index.seal(layer, pos // unit, unit_keys.transpose(1, 2),
                            self.table.valid(unit_start, unit_start + done * unit) if self.padded else None)

    def _index_sealed(self, layer: int, force: bool) -> None:
        """Index the sealed tokens of ``layer`` not indexed yet in the token index, once they are
        ``index_tokens`` or more (or whenever ``force``: after a prefill), read back from the
        tiers in place; seal each segment they fill, and retrain the open segment's codebook when
        it has grown enough. Indexing a few blocks at a time costs a decode step fewer ops; the
        tokens not indexed are in the window every step reads exactly (``token_select.plan``)."""
        index = self.tokens
        sealed = self.lengths[layer] // self.layout.block_tokens * self.layout.block_tokens
        if sealed - index.indexed[layer] < (1 if force else self.index_tokens):
            return
        while index.indexed[layer] < sealed:
            first = index.indexed[layer]
            keys, values, ok = self.span(layer, first, min(sealed, index.open_start(layer) + index.segment))
            index.append(layer, keys, values, ok)
            if index.fills_segment(layer):
                keys, _, ok = self.span(layer, index.open_start(layer), index.indexed[layer])
                index.seal(layer, keys, ok)
        if index.needs_training(layer):
            keys, _, ok = self.span(layer, index.open_start(layer), index.indexed[layer])
            index.train_open(layer, keys, ok)

    def span(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys and values ``(rows, kv_heads, stop - start, head_dim)`` of ``layer``'s positions
        ``[start, stop)``, read in place (``gather_tokens``), and which are real ``(rows, n)``
        (None without padding)."""
        heads = self.spec.kv_heads
        positions = torch.arange(start, stop, device=self.device).expand(self.rows, heads, -1)
        keys, values, bias = gather_tokens(self.memory, self.table, layer, positions)
        return keys, values, (bias[:, 0] == 0) if self.padded else None

    def _seal_open(self, layer: int, block: int) -> None:
        """The open block ``block`` of ``layer`` is full: write it through to host memory and let
        it leave the device (unless it is a sink block)."""
        slots = self.open[layer]
        kv = self.memory.layer_slab(layer)[slots]
        self.memory.seal(layer, self.table.host_pids(block), kv)
        self._estimate(layer, block, kv[:, None])
        if block >= self.sink_blocks and not self.memory.keeps_sealed_blocks_pinned():
            self.memory.unpin(layer, slots)
        self.open[layer] = None
        self.open_rows[layer] = None

    def _store(self, layer: int, block: int, kv: torch.Tensor) -> None:
        """Write full blocks ``block, block + 1, ...`` of every row (``kv`` ``(rows, n, block_tokens,
        2, kv_heads, head_dim)``) to host memory, and to the device as ``place_sealed`` decides
        (sink blocks, and every block without a host tier, pinned)."""
        rows, n = kv.shape[:2]
        self._estimate(layer, block, kv)
        pids = self.table.host_pids(slice(block, block + n))
        flat = kv.reshape(rows * n, *kv.shape[2:])
        self.memory.seal(layer, pids.reshape(-1), flat)
        pin = n if self.memory.keeps_sealed_blocks_pinned() else max(0, min(n, self.sink_blocks - block))
        self.memory.place_sealed(layer, pids, flat, pin, block + n)

    def _estimate(self, layer: int, block: int, kv: torch.Tensor) -> None:
        """Record the estimates of sealed blocks ``block, ...`` (``kv`` ``(rows, n, block_tokens, 2,
        kv_heads, head_dim)``)."""
        if self.estimates is not None and self.estimated[layer]:
            bt = self.layout.block_tokens
            valid = self.table.valid(block * bt, (block + kv.shape[1]) * bt).view(kv.shape[:3]) if self.padded else None
            self.estimates.seal(layer, block, kv, valid)

    # ------------------------------------------------------------------ between forwards

    def cut(self, tokens: int) -> None:
        """Forget every cached token past the first ``tokens`` of every row. The block that becomes
        the last is reopened: pinned, written in place, one per row (rows that shared it get their
        own copy)."""
        if self.table is None or tokens >= self.lengths[0]:
            return
        self.check_settled("truncate")
        bt = self.layout.block_tokens
        keep_open = self.lengths[0] % bt and self.lengths[0] // bt == tokens // bt
        self.memory.free(self.table.cut(tokens))
        if self.index is not None:
            self.index.cut(tokens // self.unit)
        if self.estimates is not None:
            self.estimates.cut(tokens // bt)
        self.lengths = [tokens] * self.spec.layers
        if self.tokens is not None:
            self._reopen_tokens(tokens)
        if keep_open:  # the cut falls inside the open block: it stays open
            return
        block = tokens // bt
        if not tokens % bt:
            self.open = [None] * self.spec.layers
            self.open_rows = [None] * self.spec.layers
            return
        pids, rows = np.unique(self.table.host_pids(block), return_inverse=True)
        pids = torch.from_numpy(pids).to(self.device)
        rows = torch.from_numpy(rows.reshape(-1)).to(self.device)
        # Sink blocks are pinned already.
        slots = [(self.memory.resident(layer, pids) if block < self.sink_blocks
                  else self.memory.pin(layer, pids))[rows] for layer in range(self.spec.layers)]
        self.open = self._own_open_blocks(block, slots)
        for layer in range(self.spec.layers):
            self._mirror(layer, block)

    def _reopen_tokens(self, tokens: int) -> None:
        """After a cut to ``tokens`` tokens: the token index keeps the tokens of the blocks still
        sealed; the run the cut falls into is counted again from its values."""
        index, bt = self.tokens, self.layout.block_tokens
        kept = tokens // bt * bt
        for layer in range(self.spec.layers):
            if self.token_layers[layer] and kept < index.indexed[layer]:
                keys, values, ok = self.span(layer, kept // index.run * index.run, kept)
                index.cut(layer, kept, keys, values, ok)

    def reorder(self, index: np.ndarray, what: str) -> torch.Tensor | None:
        """Row ``r`` becomes old row ``index[r]`` (``what``: the Cache method, for messages): the
        block table's rows share blocks, each row's open block is made its own (copy-on-write),
        the unit summaries and estimates are gathered. ``ConfigError`` before any change if the
        device budget cannot hold the new number of rows. Returns ``index`` on the device (None
        when nothing changed), for the caller's own per-row state."""
        if self.table is None:
            return None  # nothing cached: the next forward sizes the rows
        self.check_settled(what)
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if not index.size or index.min() < 0 or index.max() >= self.table.rows:
            raise ShapeError(f"{what}: row index {index.tolist()} out of range for {self.table.rows} rows")
        if len(index) == self.table.rows and (index == np.arange(len(index))).all():
            return None
        if len(index) > self.table.rows:
            self.check_room(len(index))
        idx = torch.from_numpy(index).to(self.device)
        bt = self.layout.block_tokens
        block = self.lengths[0] // bt if self.lengths[0] % bt else None
        opened = [slots[idx] for slots in self.open] if block is not None else None
        self.memory.free(self.table.reorder(index))
        for part in (self.index, self.estimates, self.tokens):
            if part is not None:
                part.reorder(idx)
        if opened is not None:
            self.open = self._own_open_blocks(block, opened)
            for layer in range(self.spec.layers):
                self._mirror(layer, block)
        return idx

    def _mirror(self, layer: int, block: int) -> None:
        """With ``mirror_open``: give every row's open block ``block`` of ``layer`` a host row and
        copy the block there from its device slot (which holds it whole)."""
        if self.mirror_open:
            self.open_rows[layer] = self.memory.open_in_host(layer, self.table.host_pids(block))
            self.memory.host.slab.data[self.open_rows[layer]] = self.memory.layer_slab(layer)[self.open[layer]]

    def _own_open_blocks(self, block: int, slots: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every row's block ``block`` as its own pinned open block: ``slots[layer]`` ``(rows,)``
        are the pinned slots the rows read it from now; a row that shares its pid with an earlier
        row gets a fresh pid and a copy of the block (copy-on-write). Returns the rows' slots."""
        pids = self.table.host_pids(block)
        _, first = np.unique(pids, return_index=True)
        shared = np.setdiff1d(np.arange(len(pids)), first)
        if not len(shared):
            return slots
        fresh = np.array([self.table.replace(int(row), block) for row in shared], dtype=np.int64)
        self.memory.reserve(self.table.pid_capacity)
        rows = torch.from_numpy(shared).to(self.device)
        fresh = torch.from_numpy(fresh).to(self.device)
        owned = []
        for layer, layer_slots in enumerate(slots):
            layer_slots = layer_slots.clone()
            layer_slots[rows] = self.memory.copy(layer, layer_slots[rows], fresh)
            owned.append(layer_slots)
        return owned

    # ------------------------------------------------------------------ reading whole layers

    def layer_kv(self, layer: int, rows: slice = slice(None)) -> torch.Tensor:
        """Layer ``layer``'s cached keys and values of ``rows``, ``(rows, 2, kv_heads, tokens,
        head_dim)`` on the device, read from whichever tier holds each block."""
        pids = self.table.host_pids(slice(0, self.table.blocks))[rows]
        kv = self.memory.read(layer, pids.reshape(-1))                     # (rows * blocks, bt, 2, H, D)
        kv = kv.view(pids.shape[0], -1, 2, self.spec.kv_heads, self.spec.head_dim)[:, : self.lengths[layer]]
        return kv.permute(0, 2, 3, 1, 4)

    def device_pids(self, block: int) -> torch.Tensor:
        """Every row's pid of block ``block``, on the device."""
        return torch.from_numpy(self.table.host_pids(block).copy()).to(self.device)
