"""transformers integration: ``TieredCache`` and the ``"tiercache"`` attention function.

transformers calls ``Cache.update(key, value, layer_idx)`` and then the model's attention function
with the query; ``update`` never sees the query, so the work happens in the attention function
(registered with ``AttentionInterface`` as ``"tiercache"``). ``update`` only hands this step's new
keys and values over. The mask interface entry of ``"tiercache"`` passes the 2-D padding mask
through unchanged, so the attention function knows which new tokens are padding.

**A decode step** (one new token per row) is a tensor pipeline with no host sync while the blocks
it reads are on the device or in host memory:

1. the new token's K/V are written into each row's open block, pinned in its device slot;
2. ``Selector.select`` turns the query and the unit summaries into the blocks each row reads
   (``(rows, read)``, sink + window + retrieved, ``read`` fixed by the plan);
3. ``BlockTable.pids`` maps them to physical blocks and ``TierManager.resident`` to device slots,
   copying the misses from host memory in one gather;
4. ``paged_attention`` reads those slots in place.

**A prefill** (several new tokens) attends the cached blocks (every block, sink + window, or the
blocks its queries retrieve: ``prefill``) and, causally, its own tokens; both parts merge exactly
by log-sum-exp. Its tokens are then written: full blocks go to host memory, the last partial
block becomes the open block on the device. When the blocks to read do not fit the device slots
at once, they are streamed through them in groups.

Keys are cached after RoPE (transformers applies it before ``update``), so a subset of blocks needs
no re-rotation. The cache is for inference: nothing it stores carries gradients.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterable

import numpy as np
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import prepare_padding_mask

from .config import TierConfig
from .errors import ConfigError, ShapeError, UnsupportedModelError
from .kernels.attention import causal_attention, merge_attention, paged_attention
from .manager import TierManager
from .retrieval.estimate import BlockEstimates
from .retrieval.index import UnitIndex
from .retrieval.selector import Selector
from .retrieval.summaries import make_summary
from .table import BlockTable

ATTN_NAME = "tiercache"
#: Model types whose attention modules follow the Llama layout (q/k/v projections, RoPE before the
#: cache update, ``layer_idx`` and ``num_key_value_groups`` on the module).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: Queries per causal attention call of a prefill: bounds the (queries x tokens) score tensor.
_QUERY_CHUNK = 512
PREFILL_MODES = ("full", "window", "retrieval")

_active = threading.local()


class TieredCache(Cache):
    """A transformers ``Cache`` whose KV lives in tiercache's tiers.

    ``TieredCache(model, config)`` switches ``model`` to the ``"tiercache"`` attention function
    (which behaves like plain causal attention for any other cache) and builds a ``TierManager``
    for the model's KV geometry. Use it as ``past_key_values`` of ``model(...)`` or
    ``model.generate(...)``. A batch's rows may be padded (left or right): padding tokens are
    cached but never attended and never enter retrieval.

    ``prefill``: how a forward of several new tokens attends the tokens cached before it:
    ``"full"`` (every block: exact), ``"window"`` (sink + recent window only: constant cost per
    chunk, for streams) or ``"retrieval"`` (sink + window + the blocks the chunk's queries pick:
    a question over a long stream). Decode steps (one new token) always read the retrieval
    budget. The attribute may be changed between forwards.
    """

    def __init__(self, model, config: TierConfig | None = None, prefill: str = "full") -> None:
        super().__init__(layers=[])
        mcfg = _check_model(model)
        if prefill not in PREFILL_MODES:
            raise ConfigError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
        self.model_config = mcfg
        self.n_layers = mcfg.num_hidden_layers
        self.q_heads = mcfg.num_attention_heads
        self.kv_heads = getattr(mcfg, "num_key_value_heads", None) or self.q_heads
        self.head_dim = getattr(mcfg, "head_dim", None) or mcfg.hidden_size // self.q_heads
        self.config = config or default_config(model)
        self.layout = self.config.layout(self.kv_heads, self.head_dim, model.dtype)
        if self.layout.dtype != model.dtype:
            raise ConfigError(f"config dtype {self.layout.dtype} differs from the model's {model.dtype}")
        self.prefill = prefill
        #: After a ``"retrieval"`` prefill (a question), decode steps read the blocks that prefill
        #: chose (plus sink and the recent window) instead of selecting anew each step (ReKV).
        #: The held selections are dropped by ``truncate``, ``reset`` and the next prefill.
        self.hold_selection = False
        self.manager = TierManager(self.config, self.layout, self.n_layers)
        bt = self.layout.block_tokens
        #: Tokens per selection unit: retrieval summarises and ranks units; storage moves blocks.
        self.unit = self.config.retrieval.unit_tokens or bt
        self.summary = make_summary(self.config.retrieval.summary)
        self.selector = Selector(self.config.retrieval, bt, self.unit, self.summary, self.manager.device)
        self.sink_blocks = math.ceil(self.config.retrieval.sink_tokens / bt)
        self._check_room(1)
        self.table: BlockTable | None = None
        self.index: UnitIndex | None = None
        self.estimates: BlockEstimates | None = None
        self.lengths = [0] * self.n_layers
        self._open: list[torch.Tensor | None] = [None] * self.n_layers  # open blocks' slots (rows,)
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._held: dict[int, torch.Tensor] = {}
        self._step_blocks: dict[int, torch.Tensor] = {}
        self._row_index = torch.zeros(0, 1, dtype=torch.int64)
        self._padded = False
        self._all_on_device = True
        self._read_tokens = 0
        self._cached_tokens = 0
        model.set_attn_implementation(ATTN_NAME)

    # ------------------------------------------------------------ Cache API

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Hand this step's keys and values ``(batch, kv_heads, new_tokens, head_dim)`` to the
        attention function, which caches them; returns them unchanged."""
        b, h, _, d = key_states.shape
        if (h, d) != (self.kv_heads, self.head_dim) or key_states.shape != value_states.shape:
            raise ShapeError(f"layer {layer_idx}: keys {tuple(key_states.shape)} / values "
                             f"{tuple(value_states.shape)} do not match the cache's {self.kv_heads} KV heads "
                             f"x {self.head_dim} dims: was this cache built for another model?")
        if self.table is None:
            self._start(b)
        elif b != self.table.rows:
            raise ShapeError(f"batch of {b} sequences, but this cache holds {self.table.rows}")
        self._pending[layer_idx] = (key_states, value_states)
        _active.cache = weakref.ref(self)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached for layer ``layer_idx`` (padding included): every token ever seen."""
        return self.lengths[layer_idx]

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def __len__(self) -> int:
        return self.n_layers

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def attended_fraction(self) -> float:
        """Tokens decode steps read over tokens cached, summed over layers and steps (1.0 before
        any decode step)."""
        return self._read_tokens / self._cached_tokens if self._cached_tokens else 1.0

    def reset(self) -> None:
        """Forget every cached token (and the batch size: the next forward may use another)."""
        if self.table is not None:
            self.manager.free(self.table.clear())
        self.table = self.index = self.estimates = None
        self.lengths = [0] * self.n_layers
        self._open = [None] * self.n_layers
        self._pending.clear()
        self._held.clear()

    def close(self) -> None:
        """Close the tiers the manager built (the disk tier's store releases its writer lock, so
        another process can open it)."""
        self.manager.close()

    def truncate(self, tokens: int) -> None:
        """Forget every cached token past the first ``tokens`` of every row (undo a question asked
        of a stream). The block that becomes the last is reopened: pinned, written in place."""
        if self.table is None or tokens >= self.lengths[0]:
            return
        bt = self.layout.block_tokens
        keep_open = self.lengths[0] % bt and self.lengths[0] // bt == tokens // bt
        self.manager.free(self.table.cut(tokens))
        self.index.cut(tokens // self.unit)
        if self.estimates is not None:
            self.estimates.cut(tokens // bt)
        self._held.clear()
        self.lengths = [tokens] * self.n_layers
        if keep_open:  # the cut falls inside the open block: it stays open
            return
        block = tokens // bt
        if not tokens % bt:
            self._open = [None] * self.n_layers
            return
        pids = self._device_pids(block)
        for layer in range(self.n_layers):
            # Sink blocks are pinned already.
            self._open[layer] = (self.manager.resident(layer, pids) if block < self.sink_blocks
                                 else self.manager.pin(layer, pids))

    def export_kv(self, seq: int = 0) -> torch.Tensor:
        """The whole cache of row ``seq`` as ``(layers, 2, kv_heads, tokens, head_dim)`` on the
        CPU (blocks are read from whichever tier holds them)."""
        n = self.lengths[0]
        if any(x != n for x in self.lengths):
            raise ShapeError(f"row {seq}: layers hold different numbers of tokens; finish the forward first")
        out = torch.empty((self.n_layers, 2, self.kv_heads, n, self.head_dim), dtype=self.layout.dtype)
        if not n:
            return out
        pids = self.table.host_pids(slice(0, self.table.blocks))[seq]
        for layer in range(self.n_layers):
            kv = self.manager.read(layer, pids)                    # (blocks, bt, 2, H, D)
            out[layer] = kv.permute(2, 3, 0, 1, 4).reshape(2, self.kv_heads, -1, self.head_dim)[:, :, :n].cpu()
        return out

    def import_kv(self, kv: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Fill an empty cache of one row, without any prefill: blocks are written to the tiers
        and units summarised. ``kv``: ``(layers, 2, kv_heads, tokens, head_dim)`` as ``export_kv``
        or a saved context gives it, or an iterable of each layer's ``(2, kv_heads, tokens,
        head_dim)`` in order (so a context larger than host memory at once can stream in)."""
        expected = (self.n_layers, 2, self.kv_heads, self.head_dim)
        if isinstance(kv, torch.Tensor) and (kv.dim() != 5 or (*kv.shape[:3], kv.shape[4]) != expected):
            raise ShapeError(f"import_kv: shape {tuple(kv.shape)} does not match (layers={self.n_layers}, 2, "
                             f"kv_heads={self.kv_heads}, tokens, head_dim={self.head_dim}) of this model")
        if any(self.lengths):
            raise ShapeError("import_kv: the cache already holds tokens; import into an empty cache")
        if self.table is None:
            self._start(1)
        device = self.manager.device
        try:
            with torch.no_grad():
                for layer, part in enumerate(kv):
                    if layer >= self.n_layers or part.dim() != 4 or part.shape[:2] != (2, self.kv_heads) \
                            or part.shape[3] != self.head_dim or (layer and part.shape[2] != self.lengths[0]):
                        raise ShapeError(f"import_kv: layer {layer} has shape {tuple(part.shape)}, expected (2, "
                                         f"kv_heads={self.kv_heads}, {self.lengths[0] or 'tokens'}, "
                                         f"head_dim={self.head_dim}) for one of {self.n_layers} layers")
                    self._append(layer, part[0][None].to(device), part[1][None].to(device), None)
            if len(set(self.lengths)) != 1:
                raise ShapeError(f"import_kv: got {sum(1 for n in self.lengths if n)} layers, the model has "
                                 f"{self.n_layers}")
        except BaseException:
            self.reset()  # nothing half-imported stays behind
            raise

    # ------------------------------------------------------------ attention

    @torch.no_grad()
    def attend(self, layer: int, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention output ``(batch, q_len, q_heads, head_dim)`` of ``query`` ``(batch, q_heads,
        q_len, head_dim)`` over the cached tokens of ``layer`` and this step's new ones, which it
        then caches. ``mask``: the 2-D padding mask ``(batch, tokens)`` (True: a real token), or
        None."""
        keys, values = self._pending.pop(layer)
        new = keys.shape[2]
        valid = self._new_valid(mask, new)
        past = self.lengths[layer]
        if new == 1 and past:
            self._append(layer, keys, values, valid)
            blocks = self._decode_blocks(layer, query, past + 1, scaling)
            out, _ = self._read(layer, query, blocks, scaling, lse=False, estimate=past + 1, decode=True)
        else:
            parts = [self._read(layer, query, self._prefill_blocks(layer, query, past, scaling), scaling,
                                limit=past, estimate=past if self.prefill == "retrieval" else None)] if past else []
            parts += self._attend_new(query, keys, values, valid, scaling)
            out, _ = merge_attention([p[0] for p in parts], [p[1] for p in parts])
            self._append(layer, keys, values, valid)
        return out.transpose(1, 2)

    def _new_valid(self, mask: torch.Tensor | None, new: int) -> torch.Tensor | None:
        """Which of the ``new`` tokens are real (not padding), from the 2-D mask; None: all."""
        if mask is None:
            return None
        if mask.dim() != 2 or mask.shape[0] != self.table.rows or mask.shape[1] < new:
            raise ShapeError(f"tiercache attention takes a 2-D padding mask (batch={self.table.rows}, tokens), got "
                             f"{tuple(mask.shape)}: custom 4-D masks are not supported")
        return mask[:, -new:].to(torch.bool)

    def _decode_blocks(self, layer: int, query: torch.Tensor, n_tokens: int, scaling: float) -> torch.Tensor:
        """The blocks ``(rows, read)`` a decode step of ``layer`` reads at ``n_tokens`` tokens."""
        plan = self.selector.plan(layer, n_tokens)
        held = self._held.get(layer)
        source = self._source_layer(layer)
        if held is not None:
            blocks = self.selector.with_held(plan, held)
        elif source is not None and source in self._step_blocks and not plan.full:
            blocks = self._step_blocks[source]
        else:
            blocks = self.selector.select(plan, query, self.index.data[layer], self._unit_bias(), scaling)
        self._step_blocks[layer] = blocks
        rows = self.table.rows
        self._read_tokens += rows * (plan.read_tokens if held is None else
                                     min(n_tokens, blocks.shape[1] * self.layout.block_tokens))
        self._cached_tokens += rows * n_tokens
        return blocks

    def _prefill_blocks(self, layer: int, query: torch.Tensor, past: int, scaling: float) -> torch.Tensor:
        """The cached blocks a prefill of ``layer`` reads over ``past`` cached tokens."""
        plan = self.selector.plan(layer, past)
        rows = self.table.rows
        self._held.pop(layer, None)
        if self.prefill == "window":
            return self.selector.window_blocks(past, rows)
        if self.prefill == "full" or plan.full:
            return self.selector.all_blocks(plan, rows)
        blocks = self.selector.select(plan, query, self.index.data[layer], self._unit_bias(), scaling)
        if self.hold_selection:
            self._held[layer] = blocks
        return blocks

    def _unit_bias(self) -> torch.Tensor | None:
        return self.index.bias if self._padded else None

    def _read(self, layer: int, query: torch.Tensor, blocks: torch.Tensor, scaling: float, lse: bool = True,
              limit: int | None = None, estimate: int | None = None, decode: bool = False):
        """``(out, lse)`` of ``query`` over ``blocks`` ``(rows, n)`` of ``layer``, streamed through
        the device slots in groups when they do not fit at once (``lse``: False skips it when
        there is a single group). ``limit``: read only tokens before it (a prefill reads the past
        while the first layer has already grown the table for its new tokens). ``estimate``: the
        context's tokens, whose whole blocks not read are estimated (``estimate`` in
        ``RetrievalConfig``); ``decode``: a decode step's read (which always covers its last block)."""
        rows, n = blocks.shape
        bt = self.layout.block_tokens
        pids = self.table.pids.gather(1, blocks)
        bias = self.table.bias.view(rows, -1, bt)[self._row_index, blocks]
        if limit is not None and limit < self.table.tokens:
            position = blocks[:, :, None] * bt + torch.arange(bt, device=blocks.device)
            bias = bias.masked_fill(position >= limit, float("-inf"))
        extra = None
        if estimate and self.estimates is not None and n < -(-estimate // bt):
            extra = self.estimates.extra(layer, -(-estimate // bt), blocks, sealed=None if decode else estimate // bt)
        slab = self.manager.layer_slab(layer)
        if self._all_on_device and self._fits(self.table.blocks):
            # Every block is on the device: no residency to manage, only slots to look up.
            return paged_attention(query, slab, self.manager.slots_of(layer, pids), bias, scaling, lse=lse, extra=extra)
        self._all_on_device = False  # from here on, blocks may be evicted
        group = max(1, self.manager.free_slots(layer) // rows)
        if n <= group:
            slots = self.manager.resident(layer, pids.view(-1)).view(rows, n)
            return paged_attention(query, slab, slots, bias, scaling, lse=lse, extra=extra)
        parts = []
        for a in range(0, n, group):
            slots = self.manager.resident(layer, pids[:, a : a + group].reshape(-1)).view(rows, -1)
            parts.append(paged_attention(query, slab, slots, bias[:, a : a + group], scaling,
                                         extra=extra if a == 0 else None))
        return merge_attention([p[0] for p in parts], [p[1] for p in parts])

    def _attend_new(self, query, keys, values, valid, scaling) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Causal attention of the new tokens over themselves, in chunks of queries; one
        ``(out, lse)`` covering every query."""
        rows, _, n, _ = query.shape
        if valid is None:
            valid = torch.ones(rows, n, dtype=torch.bool, device=query.device)
        outs, lses = [], []
        for a in range(0, n, _QUERY_CHUNK):
            b = min(n, a + _QUERY_CHUNK)
            o, l = causal_attention(query[:, :, a:b], keys[:, :, :b], values[:, :, :b], valid[:, :b], scaling)
            outs.append(o)
            lses.append(l)
        return [(torch.cat(outs, dim=2), torch.cat(lses, dim=2)) if len(outs) > 1 else (outs[0], lses[0])]

    # ------------------------------------------------------------ writing

    def _append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Write new keys and values ``(rows, kv_heads, n, head_dim)`` of ``layer`` into its blocks
        (``valid`` ``(rows, n)``: which are real tokens; None: all) and summarise the units they
        complete."""
        rows, _, n, _ = keys.shape
        bt, unit = self.layout.block_tokens, self.unit
        pos, end = self.lengths[layer], self.lengths[layer] + n
        if self.table.tokens < end:  # the first layer to get here grows the rows
            self.table.extend(end, valid)
            self.manager.reserve(self.table.pid_capacity)
            if n > 1 and valid is not None and not self._padded:
                # A sync, in prefill only. Retrieval masks padding once some prompt had it; a
                # decode token of padding is still never attended, only summarised.
                self._padded = bool((~valid).any())
        # (rows, n, 2, kv_heads, head_dim): the slab's token-major layout.
        kv = torch.stack((keys, values), dim=1).permute(0, 3, 1, 2, 4)
        if kv.dtype != self.layout.dtype:
            kv = kv.to(self.layout.dtype)
        slab = self.manager.layer_slab(layer)
        block, offset = divmod(pos, bt)
        # Keys of the units this append completes, with the tokens of the first one cached before.
        unit_start = pos // unit * unit
        done = end // unit - pos // unit
        unit_keys = None
        if done:
            unit_keys = kv[:, : unit_start + done * unit - pos, 0]
            if unit_start < pos:
                carried = slab[self._open[layer], offset - (pos - unit_start) : offset, 0]
                unit_keys = torch.cat([carried, unit_keys], dim=1)
        written = 0
        if offset:  # fill the open block
            written = min(n, bt - offset)
            slab[self._open[layer], offset : offset + written] = kv[:, :written]
            if offset + written == bt:
                self._seal_open(layer, block)
            block += 1
        full = (n - written) // bt
        if full:
            self._store(layer, block, kv[:, written : written + full * bt].reshape(rows, full, bt, *kv.shape[2:]))
            written += full * bt
            block += full
        if written < n:  # the last, partial block becomes the open block
            slots = self.manager.open(layer, self._device_pids(block))
            slab[slots, : n - written] = kv[:, written:]
            self._open[layer] = slots
        self.lengths[layer] = end
        if done:
            self.index.seal(layer, pos // unit, unit_keys.transpose(1, 2),
                            self.table.valid(unit_start, unit_start + done * unit) if self._padded else None)

    def _seal_open(self, layer: int, block: int) -> None:
        """The open block ``block`` of ``layer`` is full: write it through to host memory and let
        it leave the device (unless it is a sink block)."""
        slots = self._open[layer]
        kv = self.manager.layer_slab(layer)[slots]
        self.manager.seal(layer, self.table.host_pids(block), kv)
        self._estimate(layer, block, kv[:, None])
        if block >= self.sink_blocks and not self.manager.keeps_sealed_blocks_pinned():
            self.manager.unpin(layer, slots)
        self._open[layer] = None

    def _store(self, layer: int, block: int, kv: torch.Tensor) -> None:
        """Write full blocks ``block, block + 1, ...`` of every row (``kv`` ``(rows, n, block_tokens,
        2, kv_heads, head_dim)``) to host memory; sink blocks (every block, without a host tier)
        also go to pinned device slots."""
        rows, n = kv.shape[:2]
        self._estimate(layer, block, kv)
        pids = self.table.host_pids(slice(block, block + n))
        self.manager.seal(layer, pids.reshape(-1), kv.reshape(rows * n, *kv.shape[2:]))
        pinned = n if self.manager.keeps_sealed_blocks_pinned() else max(0, min(n, self.sink_blocks - block))
        # While every block fits the device, every block goes there too (see _fits).
        placed = n if self._fits(block + n + 1) else pinned
        self._all_on_device &= placed == n
        if placed:
            device_pids = torch.from_numpy(pids[:, :placed].reshape(-1)).to(self.manager.device)
            slots = self.manager.open(layer, device_pids) if placed == pinned else self.manager.place(layer, device_pids)
            self.manager.layer_slab(layer)[slots] = kv[:, :placed].reshape(rows * placed, *kv.shape[2:])

    def _estimate(self, layer: int, block: int, kv: torch.Tensor) -> None:
        """Record the estimates of sealed blocks ``block, ...`` (``kv`` ``(rows, n, block_tokens, 2,
        kv_heads, head_dim)``)."""
        if self.estimates is not None:
            bt = self.layout.block_tokens
            valid = self.table.valid(block * bt, (block + kv.shape[1]) * bt).view(kv.shape[:3]) if self._padded else None
            self.estimates.seal(layer, block, kv, valid)

    # ------------------------------------------------------------ helpers

    def _start(self, rows: int) -> None:
        """Size the block table and the unit index for a batch of ``rows`` rows."""
        self._check_room(rows)
        device = self.manager.device
        self.table = BlockTable(rows, self.layout.block_tokens, device, self.layout.dtype)
        # Summaries in the KV dtype: in fp32 they would be half the size of a bf16 cache's keys.
        self.index = UnitIndex(self.summary, self.n_layers, rows, self.kv_heads, self.head_dim, self.unit, device,
                               self.layout.dtype)
        self.estimates = BlockEstimates(self.n_layers, rows, self.kv_heads, self.head_dim, device, self.layout.dtype) \
            if self.config.retrieval.estimate else None
        self._row_index = torch.arange(rows, device=device)[:, None]
        self._padded = False
        self._all_on_device = True

    def _fits(self, blocks: int) -> bool:
        """Whether ``blocks`` blocks of every row fit the device slots of a layer. While they do,
        every block written is placed on the device as well (``_store``) and no slot is evicted
        (free slots go first), so a step only looks its slots up, as long as ``_all_on_device``
        says that has held since the cache started."""
        return self.table.rows * blocks <= self.manager.slots

    def _device_pids(self, block: int) -> torch.Tensor:
        return torch.from_numpy(self.table.host_pids(block).copy()).to(self.manager.device)

    def _source_layer(self, layer: int) -> int | None:
        """The selecting layer whose blocks ``layer`` reads (TidalDecode), or None."""
        chosen = self.config.retrieval.selection_layers
        if chosen is None or layer in chosen:
            return None
        below = [s for s in chosen if s < layer]
        return max(below) if below else None

    def _check_room(self, rows: int) -> None:
        """Per layer, the device must hold each row's sink blocks and open block, plus one block
        per row to stream the rest through."""
        need = rows * (self.sink_blocks + 2)
        if self.manager.slots < need:
            raise ConfigError(
                f"device_budget_bytes={self.config.device_budget_bytes} holds {self.manager.slots} blocks of "
                f"{self.layout.nbytes} bytes per layer ({self.n_layers} layers); a batch of {rows} needs at least "
                f"{need} per layer ({rows} x ({self.sink_blocks} sink + 1 open + 1 streamed)), i.e. "
                f"{need * self.n_layers * self.layout.nbytes} bytes"
            )


def default_config(model, context_tokens: int = 8192, device_fraction: float = 0.25) -> TierConfig:
    """A config for ``model`` sized for ``context_tokens`` tokens: the device holds
    ``device_fraction`` of that KV (at least the minimum the model needs), the host all of it."""
    mcfg = _check_model(model)
    q_heads = mcfg.num_attention_heads
    kv_heads = getattr(mcfg, "num_key_value_heads", None) or q_heads
    head_dim = getattr(mcfg, "head_dim", None) or mcfg.hidden_size // q_heads
    per_token = 2 * mcfg.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize
    total = per_token * context_tokens
    probe = TierConfig(device_budget_bytes=1, host_budget_bytes=0, dtype=model.dtype)
    block = probe.layout(kv_heads, head_dim).nbytes
    minimum = block * mcfg.num_hidden_layers * (math.ceil(probe.retrieval.sink_tokens / probe.block_tokens) + 8)
    return TierConfig(device_budget_bytes=max(int(total * device_fraction), minimum), host_budget_bytes=total,
                      dtype=model.dtype)


def wrap(model, config: TierConfig | None = None, prefill: str = "full") -> TieredCache:
    """Switch ``model`` to tiercache attention and return a fresh ``TieredCache`` for it:
    ``model.generate(ids, past_key_values=tiercache.wrap(model), ...)``."""
    return TieredCache(model, config, prefill)


def _check_model(model):
    mcfg = getattr(model, "config", None)
    model_type = getattr(mcfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"tiercache cannot take over the attention of model type {model_type!r}; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-layout attention with RoPE applied before the cache)"
        )
    if getattr(mcfg, "sliding_window", None) and getattr(mcfg, "use_sliding_window", True) and model_type != "qwen2":
        raise UnsupportedModelError(f"{model_type} with sliding_window={mcfg.sliding_window} is not supported")
    return mcfg


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """The ``"tiercache"`` entry of transformers' mask interface: the 2-D padding mask ``(batch,
    kv_length)`` as given (True: a real token), or None; causality is the attention's job."""
    return prepare_padding_mask(attention_mask, kv_length, kv_offset)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``"tiercache"`` attention function: TieredCache's attention when the cache that just
    received this layer's keys is a TieredCache, plain causal attention otherwise."""
    ref = getattr(_active, "cache", None)
    cache = ref() if ref is not None else None
    scaling = module.scaling if scaling is None else scaling
    if cache is not None and module.layer_idx in cache._pending and cache._pending[module.layer_idx][0] is key:
        return cache.attend(module.layer_idx, query, attention_mask, scaling), None
    return _causal_attention(query, key, value, attention_mask, scaling), None


def _causal_attention(query, key, value, attention_mask, scaling):
    """Causal SDPA with the queries aligned to the last keys (they follow any cached ones), and
    the 2-D padding mask if given."""
    q_len, k_len = query.shape[2], key.shape[2]
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if attention_mask is not None:
        # A padding query sees no real key; letting it see itself keeps its row free of NaN.
        own = mask & ~torch.ones_like(mask).tril(k_len - q_len - 1)
        mask = (mask & attention_mask[:, None, None, -k_len:].to(torch.bool)) | own
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2)


AttentionInterface.register(ATTN_NAME, _attention)
AttentionMaskInterface.register(ATTN_NAME, _padding_mask)
