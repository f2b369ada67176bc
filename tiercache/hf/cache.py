"""transformers integration: ``TieredCache``, a ``Cache`` whose KV lives in tiercache's tiers.

transformers calls ``Cache.update(key, value, layer_idx)`` and then the model's attention function
with the query; ``update`` never sees the query, so the work happens in the ``"tiercache"``
attention function (``tiercache.hf.attention``), which the model runs only for forwards that use a
TieredCache. ``update`` only hands this step's new keys and values over; the mask that arrives
is the 2-D padding mask, so the attention knows which new tokens are padding.

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

**Windowed layers** (``tiercache.hf.families``: sliding or chunked attention) attend exactly their
window: a step reads the blocks the window covers, and the positions before it are masked; older
blocks are never read again (they stay in the slower tiers, so ``crop`` can move back). Full
layers go through retrieval.

**Estimated tails** (``RetrievalConfig.estimate``): a full layer's decode step, and a
``"retrieval"`` prefill, adds each sealed block it does not read as one virtual token (its mean
key and value, ``tiercache.retrieval.estimate``). Layers where that would be wrong do not
estimate, and attend exactly what they read (``TieredCache.estimated`` lists the layers that do):
windowed layers, whose blocks outside the window must weigh nothing; and soft-capped models
(Gemma 2), where the estimate's guarantee, a lower bound by Jensen's inequality on ``exp``,
fails: ``exp(c * tanh(s / c))`` is not convex in the score ``s`` once ``s`` is large.

**generate's Cache methods.** Beam search (``reorder_cache``), ``batch_repeat_interleave`` and
``batch_select_indices`` rewrite the rows of the block table: rows share their blocks, and only
the open block of a row that now shares it is copied (copy-on-write); the unit summaries are
per row and are copied. ``crop`` (assisted and prompt-lookup decoding) forgets the last tokens.
All of it is host bookkeeping between forwards, outside the decode step's tensor pipeline.

Keys are cached after RoPE (transformers applies it before ``update``), so a subset of blocks needs
no re-rotation. The cache is for inference: nothing it stores carries gradients.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable

import numpy as np
import torch
from transformers.cache_utils import Cache

from ..config import TierConfig
from ..decode.table import BlockTable
from ..errors import ConfigError, ShapeError, UnsupportedModelError
from ..kernels.attention import causal_attention, merge_attention, paged_attention
from ..retrieval.estimate import BlockEstimates
from ..retrieval.index import UnitIndex
from ..retrieval.selector import Selector
from ..retrieval.summaries import make_summary
from ..tiers.manager import TierManager
from .attention import ATTN_NAME, attach, note_update
from .families import ModelSpec, model_spec

__all__ = ["ATTN_NAME", "PREFILL_MODES", "TieredCache", "default_config", "wrap"]

#: Queries per causal attention call of a prefill: bounds the (queries x tokens) score tensor.
_QUERY_CHUNK = 512
PREFILL_MODES = ("full", "window", "retrieval")


class TieredCache(Cache):
    """A transformers ``Cache`` whose KV lives in tiercache's tiers.

    ``TieredCache(model, config)`` builds a ``TierManager`` for the model's KV geometry. Use it
    as ``past_key_values`` of ``model(...)`` or ``model.generate(...)`` (every decoding strategy:
    greedy, sampling, beam search, assisted and prompt-lookup decoding). The model is switched to
    the ``"tiercache"`` attention function only for the forwards that use a TieredCache (a hook
    on its base module, ``hf_attention.attach``), and put back on its own implementation at the end
    of each, so the model behaves as before with any other cache. A batch's rows may be padded
    (left or right): padding tokens are cached but never attended and never enter retrieval.
    Supported families and how each of their layers attends: ``tiercache.hf.families``.

    ``prefill``: how a forward of several new tokens attends the tokens cached before it:
    ``"full"`` (every block: exact), ``"window"`` (sink + recent window only: constant cost per
    chunk, for streams) or ``"retrieval"`` (sink + window + the blocks the chunk's queries pick:
    a question over a long stream). Decode steps (one new token) always read the retrieval
    budget. The attribute may be changed between forwards.
    """

    def __init__(self, model, config: TierConfig | None = None, prefill: str = "full") -> None:
        super().__init__(layers=[])
        spec = model_spec(model)
        if prefill not in PREFILL_MODES:
            raise ConfigError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
        self.model_config = model.config
        self.spec = spec
        self.n_layers, self.q_heads, self.kv_heads, self.head_dim = (spec.layers, spec.q_heads, spec.kv_heads,
                                                                     spec.head_dim)
        #: Per layer: its ``families.Window`` (sliding or chunked), or None (full attention).
        self.windows = spec.windows
        self.config = config or default_config(model)
        #: Per layer: whether its reads add the estimate of the blocks they skip (module docstring).
        self.estimated = tuple(self.config.retrieval.estimate and window is None and spec.softcap is None
                               for window in self.windows)
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
        self._left_pad: torch.Tensor | None = None  # (rows, 1) leading padding tokens, for chunked layers
        self._ar = torch.arange(256, device=self.manager.device)
        self._model = weakref.ref(model)
        self._all_on_device = True
        self._read_tokens = 0
        self._cached_tokens = 0
        attach(model, TieredCache)

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
        note_update(self)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached for layer ``layer_idx`` (padding included): every token ever seen."""
        return self.lengths[layer_idx]

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for transformers' mask functions: every cached token plus the
        query, offset 0, for every mask kind (full, sliding, chunked). The ``"tiercache"`` mask is
        the 2-D padding mask as given; causality and windows are the attention's."""
        return self.get_seq_length(layer_idx) + query_length, 0

    def __len__(self) -> int:
        """Layers of the model (transformers: one cache layer per model layer)."""
        return self.n_layers

    @property
    def is_compileable(self) -> bool:
        return False

    # transformers' Cache derives these per-layer lists from its layer objects, which TieredCache
    # does not keep; generate reads them (5.24 feeds a cache whose is_linear is all True, as
    # ``[]`` is, every input token again).
    @property
    def is_sliding(self) -> list[bool]:
        """Per layer: whether it attends a window (sliding or chunked)."""
        return [window is not None for window in self.windows]

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: whether it is a linear-attention layer (never, in the supported families)."""
        return [False] * self.n_layers

    @property
    def is_dummy(self) -> list[bool]:
        """Per layer: whether it stores nothing (shares another layer's KV; never, here)."""
        return [False] * self.n_layers

    @property
    def batch_size(self) -> int:
        """Rows of the batch, -1 before the first forward."""
        return self.table.rows if self.table is not None else -1

    @property
    def is_croppable(self) -> bool:
        """``crop`` puts the cache back exactly: windowed layers keep their older blocks too."""
        return True

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
        self._step_blocks.clear()
        self._left_pad = None

    def close(self) -> None:
        """Close the tiers the manager built (the disk tier's store releases its writer lock, so
        another process can open it)."""
        self.manager.close()

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens of every row: transformers 5's ``crop``,
        a negative count (0 does nothing). Assisted and prompt-lookup decoding call it to drop the
        candidate tokens the model rejected. ``ShapeError`` for a positive count (the older
        absolute-length meaning, which transformers 5.18 removed: use ``truncate(tokens)``) or
        more tokens than are cached."""
        if tokens_to_remove > 0:
            raise ShapeError(f"crop({tokens_to_remove}): transformers 5 crops by a negative count of tokens to "
                             f"remove; to keep the first {tokens_to_remove} tokens call truncate({tokens_to_remove})")
        n = -int(tokens_to_remove)
        if n > self.get_seq_length():
            raise ShapeError(f"crop({tokens_to_remove}): the cache holds {self.get_seq_length()} tokens")
        if n:
            self.truncate(self.get_seq_length() - n)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row ``r`` becomes old row ``beam_idx[r]``. Rows share their blocks; a row
        that now shares its open block gets a copy of it (copy-on-write); summaries are copied.
        One host sync (reading ``beam_idx``), between forwards."""
        self._reindex(beam_idx.detach().cpu().numpy(), "reorder_cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row becomes ``repeats`` consecutive rows (sharing its blocks). ``ConfigError``,
        with nothing changed, if the device budget cannot hold that many rows."""
        if self.table is not None:
            self._reindex(np.repeat(np.arange(self.table.rows), repeats), "batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (integer indices or a boolean mask), in that order."""
        if self.table is not None:
            picked = torch.as_tensor(indices).detach().cpu().numpy()
            self._reindex(np.arange(self.table.rows)[picked], "batch_select_indices")

    def __deepcopy__(self, memo: dict) -> "TieredCache":
        """``copy.deepcopy(cache)``: ``copy()`` (transformers' pattern for reusing a prompt's cache)."""
        return self.copy()

    def copy(self, config: TierConfig | None = None) -> "TieredCache":
        """A new cache holding the same tokens of every row, in fresh tiers built from ``config``
        (default: this cache's). A disk tier's store takes one writer at a time: with a disk tier,
        give a config with another ``disk_path`` (``ConfigError`` otherwise)."""
        config = config or self.config
        if config.disk_budget_bytes and self.config.disk_budget_bytes and config.disk_path == self.config.disk_path:
            raise ConfigError(f"copy: the disk tier at {str(config.disk_path)!r} is this cache's store (one writer at a "
                              "time); pass copy(config=dataclasses.replace(cache.config, disk_path=...))")
        model = self._model()
        if model is None:
            raise ConfigError("copy: the model this cache was built for no longer exists")
        twin = TieredCache(model, config, self.prefill)
        twin.hold_selection = self.hold_selection
        if self.table is not None and self.lengths[0]:
            self._check_settled("copy")
            n = self.lengths[0]
            valid = self.table.valid(0, n)
            twin._start(self.table.rows)
            with torch.no_grad():
                for layer in range(self.n_layers):
                    kv = self._layer_kv(layer).to(twin.manager.device)    # (rows, 2, H, n, D)
                    twin._append(layer, kv[:, 0], kv[:, 1], valid.to(twin.manager.device))
        twin._held = {layer: held.clone() for layer, held in self._held.items()}
        twin._read_tokens, twin._cached_tokens = self._read_tokens, self._cached_tokens
        return twin

    def truncate(self, tokens: int) -> None:
        """Forget every cached token past the first ``tokens`` of every row (undo a question asked
        of a stream, ``crop``). The block that becomes the last is reopened: pinned, written in
        place, one per row (rows that shared it get their own copy)."""
        if self.table is None or tokens >= self.lengths[0]:
            return
        self._check_settled("truncate")
        bt = self.layout.block_tokens
        keep_open = self.lengths[0] % bt and self.lengths[0] // bt == tokens // bt
        self.manager.free(self.table.cut(tokens))
        self.index.cut(tokens // self.unit)
        if self.estimates is not None:
            self.estimates.cut(tokens // bt)
        self._held.clear()
        self._left_pad = None
        self.lengths = [tokens] * self.n_layers
        if keep_open:  # the cut falls inside the open block: it stays open
            return
        block = tokens // bt
        if not tokens % bt:
            self._open = [None] * self.n_layers
            return
        pids, rows = np.unique(self.table.host_pids(block), return_inverse=True)
        pids = torch.from_numpy(pids).to(self.manager.device)
        rows = torch.from_numpy(rows.reshape(-1)).to(self.manager.device)
        # Sink blocks are pinned already.
        slots = [(self.manager.resident(layer, pids) if block < self.sink_blocks
                  else self.manager.pin(layer, pids))[rows] for layer in range(self.n_layers)]
        self._open = self._own_open_blocks(block, slots)

    def export_kv(self, seq: int = 0) -> torch.Tensor:
        """The whole cache of row ``seq`` as ``(layers, 2, kv_heads, tokens, head_dim)`` on the
        CPU (blocks are read from whichever tier holds them)."""
        n = self.lengths[0]
        if any(x != n for x in self.lengths):
            raise ShapeError(f"row {seq}: layers hold different numbers of tokens; finish the forward first")
        out = torch.empty((self.n_layers, 2, self.kv_heads, n, self.head_dim), dtype=self.layout.dtype)
        if not n:
            return out
        for layer in range(self.n_layers):
            out[layer] = self._layer_kv(layer, slice(seq, seq + 1))[0].cpu()
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
        None. A windowed layer attends its window only (module docstring); scores are
        soft-capped as the model's spec says (Gemma 2)."""
        keys, values = self._pending.pop(layer)
        softcap = self.spec.softcap
        new = keys.shape[2]
        valid = self._new_valid(mask, new)
        past = self.lengths[layer]
        window = self.windows[layer]
        if new == 1 and past:
            self._append(layer, keys, values, valid)
            if window is None:
                blocks, lower = self._decode_blocks(layer, query, past + 1, scaling), None
            else:
                blocks = self._window_blocks(layer, past, past)
                lower = (past - window.tokens + 1 if window.kind == "sliding" else
                         self._lower(layer, past, 1, valid)[:, :, None])
            out, _ = self._read(layer, query, blocks, scaling, lse=False, lower=lower, softcap=softcap,
                                estimate=past + 1 if self.estimated[layer] else None, decode=True)
        else:
            lower = None if window is None else self._lower(layer, past, new, valid)
            parts = []
            if past:
                blocks = (self._prefill_blocks(layer, query, past, scaling) if window is None else
                          self._window_blocks(layer, past, past - 1))
                estimate = past if self.prefill == "retrieval" and self.estimated[layer] else None
                parts.append(self._read(layer, query, blocks, scaling, limit=past, softcap=softcap, merged=True,
                                        lower=None if lower is None else lower[:, :, None, None], estimate=estimate))
            parts += self._attend_new(query, keys, values, valid, scaling, softcap,
                                      None if lower is None else (lower - past, window.tokens))
            out, _ = merge_attention([p[0] for p in parts], [p[1] for p in parts], query.dtype)
            self._append(layer, keys, values, valid)
        return out.transpose(1, 2)

    def check_layer(self, layer: int, sliding_window: int | None, softcap: float | None) -> None:
        """``UnsupportedModelError`` unless the sliding window and the soft-capping an attention
        module asks for (its ``sliding_window`` and ``softcap`` arguments; None for full and
        chunked layers, and for no capping) are what this cache read from the model's config
        (``self.spec``): a mismatch would be silently wrong attention."""
        window = self.windows[layer]
        expected = window.tokens if window is not None and window.kind == "sliding" else None
        if sliding_window != expected or softcap != self.spec.softcap:
            raise UnsupportedModelError(
                f"layer {layer} attends with sliding_window={sliding_window}, softcap={softcap}, but its config "
                f"reads as {window or 'full attention'}, softcap={self.spec.softcap}: this model's layers are not "
                "what tiercache.hf.families expects")

    def _new_valid(self, mask: torch.Tensor | None, new: int) -> torch.Tensor | None:
        """Which of the ``new`` tokens are real (not padding), from the 2-D mask; None: all."""
        if mask is None:
            return None
        if mask.dim() != 2 or mask.shape[0] != self.table.rows or mask.shape[1] < new:
            raise ShapeError(f"tiercache attention takes a 2-D padding mask (batch={self.table.rows}, tokens), got "
                             f"{tuple(mask.shape)}: custom 4-D masks are not supported")
        return mask[:, -new:].to(torch.bool)

    def _window_blocks(self, layer: int, first_query: int, last_key: int) -> torch.Tensor:
        """The blocks ``(rows, n)`` windowed layer ``layer`` reads for queries from position
        ``first_query`` on, over the cached keys up to position ``last_key``: every block the
        window of ``first_query`` touches (``_lower`` masks what precedes each query's window). A
        decode step (``first_query == last_key``) is counted in ``attended_fraction``."""
        window = self.windows[layer]
        bt, rows = self.layout.block_tokens, self.table.rows
        if first_query == last_key:
            self._read_tokens += rows * min(window.tokens, last_key + 1)
            self._cached_tokens += rows * (last_key + 1)
        return self._arange(max(0, first_query - window.tokens + 1) // bt, last_key // bt + 1).expand(rows, -1)

    def _lower(self, layer: int, first_query: int, n: int, valid: torch.Tensor | None) -> torch.Tensor:
        """The first position each of the queries at ``first_query ... first_query + n - 1``
        attends in windowed layer ``layer``: ``(1, n)`` for a sliding window; ``(rows, n)`` for
        chunks, which start at each row's first real token, as transformers' chunked mask counts
        them (``valid``: which of the ``n`` new tokens are real; None: all)."""
        window = self.windows[layer]
        positions = self._arange(first_query, first_query + n)[None]
        if window.kind == "sliding":
            return positions - (window.tokens - 1)
        pad = self._left_padding(first_query, n, valid)
        return pad + torch.div(positions - pad, window.tokens, rounding_mode="floor") * window.tokens

    def _left_padding(self, past: int, new: int, valid: torch.Tensor | None) -> torch.Tensor:
        """``(rows, 1)``: each row's padding tokens before its first real one, over the ``past``
        cached tokens and the ``new`` ones (``valid``). Computed in a prefill and kept for the
        decode steps after it (their tokens are real, so it cannot change)."""
        if new == 1 and self._left_pad is not None:
            return self._left_pad
        rows = self.table.rows
        ok = torch.cat([self.table.valid(0, past), torch.ones(rows, new, dtype=torch.bool, device=self.manager.device)
                        if valid is None else valid], dim=1)
        self._left_pad = (ok.cumsum(1) == 0).sum(1, keepdim=True)
        return self._left_pad

    def _arange(self, start: int, stop: int) -> torch.Tensor:
        """``arange(start, stop)`` on the device, as a view of one range kept for every call."""
        if stop > self._ar.numel():
            self._ar = torch.arange(max(stop, 2 * self._ar.numel()), device=self._ar.device)
        return self._ar[start:stop]

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
              limit: int | None = None, lower: int | torch.Tensor | None = None, softcap: float | None = None,
              estimate: int | None = None, decode: bool = False, merged: bool = False):
        """``(out, lse)`` of ``query`` over ``blocks`` ``(rows, n)`` of ``layer``, streamed through
        the device slots in groups when they do not fit at once (``lse``: False skips it when
        there is a single group). ``limit``: read only tokens before it (a prefill reads the past
        while the first layer has already grown the table for its new tokens). ``lower``: the
        first position attended (a window): an int, ``(rows, 1, 1)``, or ``(rows, q_len, 1, 1)``
        per query. ``softcap``: the scores' soft-capping (Gemma 2), or None. ``estimate``: the
        context's tokens, whose whole blocks not read are estimated (``estimate`` in
        ``RetrievalConfig``; only for the layers in ``estimated``); ``decode``: a decode step's read
        (which always covers its last block); ``merged``: the caller merges the result with other
        parts (it stays fp32, to be rounded once after the merge)."""
        rows, n = blocks.shape
        bt = self.layout.block_tokens
        pids = self.table.pids.gather(1, blocks)
        bias = self.table.bias.view(rows, -1, bt)[self._row_index, blocks]
        if (limit is not None and limit < self.table.tokens) or lower is not None:
            position = blocks[:, :, None] * bt + torch.arange(bt, device=blocks.device)
            if limit is not None and limit < self.table.tokens:
                bias = bias.masked_fill(position >= limit, float("-inf"))
            if lower is not None:
                if isinstance(lower, torch.Tensor) and lower.dim() == 4:  # one bias per query
                    position, bias = position[:, None], bias[:, None]
                bias = bias.masked_fill(position < lower, float("-inf"))
        extra = None
        if estimate and self.estimates is not None and n < -(-estimate // bt):
            extra = self.estimates.extra(layer, -(-estimate // bt), blocks, sealed=None if decode else estimate // bt)
        slab = self.manager.layer_slab(layer)
        out_dtype = torch.float32 if merged else None
        if self._all_on_device and self._fits(self.table.blocks):
            # Every block is on the device: no residency to manage, only slots to look up.
            slots = self.manager.slots_of(layer, pids)
            return paged_attention(query, slab, slots, bias, scaling, lse=lse, extra=extra, softcap=softcap,
                                   out_dtype=out_dtype)
        self._all_on_device = False  # from here on, blocks may be evicted
        group = max(1, self.manager.free_slots(layer) // rows)
        if n <= group:
            slots = self.manager.resident(layer, pids.view(-1)).view(rows, n)
            return paged_attention(query, slab, slots, bias, scaling, lse=lse, extra=extra, softcap=softcap,
                                   out_dtype=out_dtype)
        parts = []
        for a in range(0, n, group):
            slots = self.manager.resident(layer, pids[:, a : a + group].reshape(-1)).view(rows, -1)
            parts.append(paged_attention(query, slab, slots, bias[..., a : a + group, :], scaling,
                                         extra=extra if a == 0 else None, softcap=softcap, out_dtype=torch.float32))
        return merge_attention([p[0] for p in parts], [p[1] for p in parts], out_dtype or query.dtype)

    def _attend_new(self, query, keys, values, valid, scaling, softcap=None, window=None
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Causal attention of the new tokens over themselves, in chunks of queries; one
        ``(out, lse)`` covering every query. ``window``: ``(first, span)`` for a windowed layer,
        ``first`` ``(rows or 1, n)`` the first new token each query may attend, ``span`` the
        window's tokens (keys further back than that are not passed at all)."""
        rows, _, n, _ = query.shape
        if valid is None:
            valid = torch.ones(rows, n, dtype=torch.bool, device=query.device)
        outs, lses = [], []
        for a in range(0, n, _QUERY_CHUNK):
            b = min(n, a + _QUERY_CHUNK)
            lo, ok = 0, valid[:, :b]
            if window is not None:
                first, span = window
                lo = max(0, a - span + 1)
                ok = valid[:, None, lo:b] & (self._arange(lo, b) >= first[:, a:b, None])    # (rows, b - a, b - lo)
            o, l = causal_attention(query[:, :, a:b], keys[:, :, lo:b], values[:, :, lo:b], ok, scaling,
                                    softcap=softcap, out_dtype=torch.float32)
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
        if self.estimates is not None and self.estimated[layer]:
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
            if any(self.estimated) else None
        self._row_index = torch.arange(rows, device=device)[:, None]
        self._padded = False
        self._left_pad = None
        self._all_on_device = True

    def _fits(self, blocks: int) -> bool:
        """Whether ``blocks`` blocks of every row fit the device slots of a layer. While they do,
        every block written is placed on the device as well (``_store``) and no slot is evicted
        (free slots go first), so a step only looks its slots up, as long as ``_all_on_device``
        says that has held since the cache started."""
        return self.table.rows * blocks <= self.manager.slots

    def _check_settled(self, what: str) -> None:
        """``ShapeError`` in the middle of a forward (some layers hold more tokens than others)."""
        if self._pending or len(set(self.lengths)) != 1:
            raise ShapeError(f"{what}: the cache is in the middle of a forward (layers hold {sorted(set(self.lengths))} "
                             "tokens); call it between forwards")

    def _reindex(self, index: np.ndarray, what: str) -> None:
        """Row ``r`` becomes old row ``index[r]`` (``what``: the Cache method, for messages): the
        block table's rows share blocks, each row's open block is made its own (copy-on-write),
        the unit summaries and held selections are gathered. ``ConfigError`` before any change if
        the device budget cannot hold the new number of rows."""
        if self.table is None:
            return  # nothing cached: the next forward sizes the rows
        self._check_settled(what)
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if not index.size or index.min() < 0 or index.max() >= self.table.rows:
            raise ShapeError(f"{what}: row index {index.tolist()} out of range for {self.table.rows} rows")
        if len(index) == self.table.rows and (index == np.arange(len(index))).all():
            return
        if len(index) > self.table.rows:
            self._check_room(len(index))
        idx = torch.from_numpy(index).to(self.manager.device)
        bt = self.layout.block_tokens
        block = self.lengths[0] // bt if self.lengths[0] % bt else None
        opened = [slots[idx] for slots in self._open] if block is not None else None
        self.manager.free(self.table.reorder(index))
        self.index.reorder(idx)
        if self.estimates is not None:
            self.estimates.reorder(idx)
        self._row_index = torch.arange(len(index), device=self.manager.device)[:, None]
        self._held = {layer: held[idx] for layer, held in self._held.items()}
        self._step_blocks.clear()
        if self._left_pad is not None:
            self._left_pad = self._left_pad[idx]
        if opened is not None:
            self._open = self._own_open_blocks(block, opened)

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
        self.manager.reserve(self.table.pid_capacity)
        rows = torch.from_numpy(shared).to(self.manager.device)
        fresh = torch.from_numpy(fresh).to(self.manager.device)
        owned = []
        for layer, layer_slots in enumerate(slots):
            layer_slots = layer_slots.clone()
            layer_slots[rows] = self.manager.copy(layer, layer_slots[rows], fresh)
            owned.append(layer_slots)
        return owned

    def _layer_kv(self, layer: int, rows: slice = slice(None)) -> torch.Tensor:
        """Layer ``layer``'s cached keys and values of ``rows``, ``(rows, 2, kv_heads, tokens,
        head_dim)`` on the device, read from whichever tier holds each block."""
        pids = self.table.host_pids(slice(0, self.table.blocks))[rows]
        kv = self.manager.read(layer, pids.reshape(-1))                     # (rows * blocks, bt, 2, H, D)
        kv = kv.view(pids.shape[0], -1, 2, self.kv_heads, self.head_dim)[:, : self.lengths[layer]]
        return kv.permute(0, 2, 3, 1, 4)

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
    ``device_fraction`` of that KV (at least the minimum the model needs, and the widest window of
    its windowed layers, so a window stays on the device), the host all of it."""
    spec: ModelSpec = model_spec(model)
    per_token = 2 * spec.layers * spec.kv_heads * spec.head_dim * model.dtype.itemsize
    total = per_token * context_tokens
    probe = TierConfig(device_budget_bytes=1, host_budget_bytes=0, dtype=model.dtype)
    block = probe.layout(spec.kv_heads, spec.head_dim).nbytes
    sink = math.ceil(probe.retrieval.sink_tokens / probe.block_tokens)
    window = math.ceil(min(spec.widest_window, context_tokens) / probe.block_tokens) + 1 if spec.widest_window else 0
    minimum = block * spec.layers * (sink + max(8, window + 2))
    return TierConfig(device_budget_bytes=max(int(total * device_fraction), minimum), host_budget_bytes=total,
                      dtype=model.dtype)


def wrap(model, config: TierConfig | None = None, prefill: str = "full") -> TieredCache:
    """A fresh ``TieredCache`` for ``model``:
    ``model.generate(ids, past_key_values=tiercache.wrap(model), ...)``."""
    return TieredCache(model, config, prefill)
