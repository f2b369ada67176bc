"""``DecodeStep``: one layer's attention over what a batch has cached, as a tensor pipeline.

**A decode step** (one new token per row) of a full-attention layer, with no host sync while the
blocks it reads are on the device or in host memory:

1. **write**: the new token's K/V go into each row's open block (``BatchKV.append``);
2. **plan**: how many blocks the step reads, and how many are sink and window
   (``Selector.plan``, host integers);
3. **select**: the blocks each row reads, ``(rows, read)`` (``Selector.select``: the query scores
   the unit summaries; or a question's held selection; or the selecting layer's blocks);
4. **count**: tokens read and cached (``ReadCounter``), the one place every read path counts;
5. **resident**: the blocks' pids (``BlockTable.pids``) become device slots
   (``Residency.read_plan``, then ``lookup`` or ``TierManager.resident``, which copies misses
   from host memory in one gather);
6. **attend**: ``paged_attention`` reads those slots in place; the blocks not read join the same
   softmax as one estimated token each (``BlockEstimates``) where the layer estimates.

A windowed layer (``decode.windows``) reads the blocks its window covers instead of steps 2-3.

**A prefill** (several new tokens) attends the cached blocks (``prefill``: every block, sink +
window, or the blocks its queries retrieve) and, causally, its own tokens; both parts merge
exactly by log-sum-exp; then its tokens are written.

**Estimated tails** (``RetrievalConfig.estimate``): layers where an estimate would be wrong do
not estimate (``estimated``): windowed layers, whose blocks outside the window must weigh
nothing; and soft-capped models (Gemma 2), where the estimate's guarantee, a lower bound by
Jensen's inequality on ``exp``, fails: ``exp(c * tanh(s / c))`` is not convex in the score ``s``
once ``s`` is large.
"""

from __future__ import annotations

import torch

from ..config import TierConfig
from ..errors import ConfigError, ShapeError
from ..kernels.attention import causal_attention, merge_attention, paged_attention, token_attention
from ..retrieval import token_select
from ..retrieval.selector import Selector
from ..retrieval.summaries import make_summary
from ..spec import ModelSpec
from ..tiers.manager import TierManager
from .accounting import ReadCounter
from .gather import gather_tokens
from .kv import BatchKV
from .windows import Windows

#: Queries per causal attention call of a prefill: bounds the (queries x tokens) score tensor.
_QUERY_CHUNK = 512
PREFILL_MODES = ("full", "window", "retrieval")


class DecodeStep:
    """Attention of a model of ``spec`` over its batch's KV, kept in ``memory`` as ``config``
    says (module docstring).

    ``prefill``: how a forward of several new tokens attends the tokens cached before it:
    ``"full"`` (every block: exact), ``"window"`` (sink + recent window only: constant cost per
    chunk, for streams) or ``"retrieval"`` (sink + window + the blocks the chunk's queries pick).
    ``hold_selection``: after a ``"retrieval"`` prefill (a question), decode steps read the
    blocks that prefill chose (plus sink and the recent window) instead of selecting anew (ReKV);
    held selections are dropped by ``cut``, ``reset`` and the next prefill."""

    def __init__(self, spec: ModelSpec, config: TierConfig, memory: TierManager, prefill: str = "full") -> None:
        if prefill not in PREFILL_MODES:
            raise ConfigError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
        if config.retrieval.index == "tokens":
            if config.retrieval.selection_layers is not None:
                raise ConfigError("retrieval selection_layers (layers reusing another's selection) works with "
                                  "index='blocks' only: with index='tokens' every layer selects its own tokens")
            if config.host_codec != "raw":
                raise ConfigError(f"retrieval index='tokens' reads single tokens from host memory in place, which "
                                  f"needs host_codec='raw' (got {config.host_codec!r}); use index='blocks' with "
                                  "an encoded host tier")
        self.spec = spec
        self.config = config
        self.memory = memory
        bt = memory.layout.block_tokens
        self.block_tokens = bt
        #: Per layer: whether its reads add the estimate of the blocks they skip (module docstring).
        self.estimated = tuple(config.retrieval.estimate and window is None and spec.softcap is None
                               for window in spec.windows)
        #: Tokens per selection unit: retrieval summarises and ranks units; storage moves blocks.
        unit = config.retrieval.unit_tokens or bt
        summary = make_summary(config.retrieval.summary)
        self.selector = Selector(config.retrieval, bt, unit, summary, memory.device)
        self.kv = BatchKV(spec, config, memory, summary, unit, self.estimated)
        self.windows = Windows(spec.windows, bt, memory.device)
        self.count = ReadCounter(memory.layout.nbytes // memory.layout.block_tokens)
        self.prefill = prefill
        self.hold_selection = False
        self.held: dict[int, torch.Tensor] = {}
        self._step_blocks: dict[int, torch.Tensor] = {}  # this step's selection per layer (TidalDecode)
        self._row_index = torch.zeros(0, 1, dtype=torch.int64)
        self._shared: tuple | None = None  # (key, token_select.Prefix) of the current step

    # ------------------------------------------------------------------ rows

    def start(self, rows: int) -> None:
        """Size everything for a batch of ``rows`` rows."""
        self._shared = None
        self.kv.start(rows)
        self._row_index = torch.arange(rows, device=self.memory.device)[:, None]
        self.windows.forget_padding()

    def reset(self) -> None:
        """Forget every cached token and the batch size."""
        self._shared = None
        self.kv.reset()
        self.held.clear()
        self._step_blocks.clear()
        self.windows.forget_padding()

    def cut(self, tokens: int) -> None:
        """Forget every cached token past the first ``tokens`` of every row (``BatchKV.cut``)."""
        if self.kv.table is None or tokens >= self.kv.lengths[0]:
            return
        self.kv.cut(tokens)
        self.held.clear()
        self._shared = None
        self.windows.forget_padding()

    def reorder(self, index, what: str) -> None:
        """Row ``r`` becomes old row ``index[r]`` (``BatchKV.reorder``); held selections follow."""
        idx = self.kv.reorder(index, what)
        if idx is None:
            return
        self._row_index = torch.arange(len(idx), device=self.memory.device)[:, None]
        self.held = {layer: held[idx] for layer, held in self.held.items()}
        self._shared = None
        self._step_blocks.clear()
        self.windows.reorder(idx)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes each structure holds on the device now (``accounting.CacheStats.resident``)."""
        kv, itemsize = self.kv, self.memory.layout.dtype.itemsize
        spec, rows = self.spec, kv.rows
        tokens = kv.lengths[0] if kv.table is not None else 0
        index = estimates = 0
        if kv.tokens is not None:
            index = kv.tokens.resident_bytes()
        elif kv.index is not None:
            units = tokens // kv.unit
            index = units * rows * spec.kv_heads * self.selector.unit_bytes(spec.head_dim, itemsize) * sum(
                1 for w in spec.windows if w is None)
            if kv.estimates is not None:
                sealed = tokens // self.block_tokens
                estimates = sealed * rows * (2 * spec.kv_heads * spec.head_dim + 1) * itemsize * sum(self.estimated)
        return {"index": index, "estimates": estimates, "slots": self.memory.slab.capacity_bytes,
                "kv": tokens * rows * spec.layers * self.count.token_bytes}

    # ------------------------------------------------------------------ attention

    @torch.no_grad()
    def attend(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention output ``(rows, q_len, q_heads, head_dim)`` of ``query`` ``(rows, q_heads,
        q_len, head_dim)`` over the cached tokens of ``layer`` and this forward's new ``keys`` /
        ``values`` ``(rows, kv_heads, q_len, head_dim)``, which it then caches. ``mask``: the
        2-D padding mask ``(rows, tokens)`` (True: a real token), or None."""
        kv, softcap = self.kv, self.spec.softcap
        new = keys.shape[2]
        valid = self._new_valid(mask, new)
        past = kv.lengths[layer]
        window = self.windows[layer]
        rows = kv.rows
        if new == 1 and past:
            kv.append(layer, keys, values, valid)
            if window is None and kv.tokens is not None:
                out, _ = self._read_tokens(layer, query, past + 1, scaling, decode=True)
                return out.transpose(1, 2)
            if window is None:
                blocks = self._decode_blocks(layer, query, past + 1, scaling)
                lower = None
            else:
                blocks = self.windows.blocks(layer, past, past, rows)
                self.count.count(rows, self.windows.read_tokens(layer, past), past + 1)
                lower = (past - window.tokens + 1 if window.kind == "sliding" else
                         self.windows.lower(layer, past, 1, valid, kv.table)[:, :, None])
            out, _ = self.read(layer, query, blocks, scaling, lse=False, lower=lower,
                               estimate=past + 1 if self.estimated[layer] else None, decode=True)
            return out.transpose(1, 2)
        lower = None if window is None else self.windows.lower(layer, past, new, valid, kv.table)
        parts = []
        if past and window is None and kv.tokens is not None and self.prefill == "retrieval":
            self.held.pop(layer, None)
            parts.append(self._read_tokens(layer, query, past, scaling))
        elif past:
            blocks = (self._prefill_blocks(layer, query, past, scaling) if window is None else
                      self.windows.blocks(layer, past, past - 1, rows))
            estimate = past if self.prefill == "retrieval" and self.estimated[layer] else None
            parts.append(self.read(layer, query, blocks, scaling, limit=past, merged=True, estimate=estimate,
                                   lower=None if lower is None else lower[:, :, None, None]))
        parts.append(self._attend_new(query, keys, values, valid, scaling, softcap,
                                      None if lower is None else (lower - past, window.tokens)))
        out, _ = merge_attention([p[0] for p in parts], [p[1] for p in parts], query.dtype)
        kv.append(layer, keys, values, valid)
        return out.transpose(1, 2)

    def _new_valid(self, mask: torch.Tensor | None, new: int) -> torch.Tensor | None:
        """Which of the ``new`` tokens are real (not padding), from the 2-D mask; None: all."""
        if mask is None:
            return None
        rows = self.kv.rows
        if mask.dim() != 2 or mask.shape[0] != rows or mask.shape[1] < new:
            raise ShapeError(f"tiercache attention takes a 2-D padding mask (batch={rows}, tokens), got "
                             f"{tuple(mask.shape)}: custom 4-D masks are not supported")
        return mask[:, -new:].to(torch.bool)

    def _decode_blocks(self, layer: int, query: torch.Tensor, n_tokens: int, scaling: float) -> torch.Tensor:
        """The blocks ``(rows, read)`` a decode step of full layer ``layer`` reads at ``n_tokens``
        tokens, counted: a question's held selection, the selecting layer's blocks
        (``RetrievalConfig.selection_layers``), or the query's own selection."""
        plan = self.selector.plan(layer, n_tokens)
        held = self.held.get(layer)
        source = self._source_layer(layer)
        if held is not None:
            blocks = self.selector.with_held(plan, held)
        elif source is not None and source in self._step_blocks and not plan.full:
            blocks = self._step_blocks[source]
        else:
            blocks = self.selector.select(plan, query, self.kv.index.data[layer], self._unit_bias(), scaling)
        self._step_blocks[layer] = blocks
        rows, heads, itemsize = self.kv.rows, self.spec.kv_heads, self.memory.layout.dtype.itemsize
        read = plan.read_tokens if held is None else min(n_tokens, blocks.shape[1] * self.block_tokens)
        scanned = plan.scanned_units * self.selector.unit_bytes(self.spec.head_dim, itemsize) \
            if held is None and source is None else 0
        unread = plan.n_blocks - blocks.shape[1] if self.estimated[layer] else 0
        self.count.count(rows, read, n_tokens, scanned * rows * heads,
                         unread * rows * (2 * heads * self.spec.head_dim + 1) * itemsize)
        return blocks

    def _prefill_blocks(self, layer: int, query: torch.Tensor, past: int, scaling: float) -> torch.Tensor:
        """The cached blocks a prefill of full layer ``layer`` reads over ``past`` cached tokens."""
        plan = self.selector.plan(layer, past)
        rows = self.kv.rows
        self.held.pop(layer, None)
        if self.prefill == "window":
            return self.selector.window_blocks(past, rows)
        if self.prefill == "full" or plan.full:
            return self.selector.all_blocks(plan, rows)
        blocks = self.selector.select(plan, query, self.kv.index.data[layer], self._unit_bias(), scaling)
        if self.hold_selection:
            self.held[layer] = blocks
        return blocks

    def _read_tokens(self, layer: int, query: torch.Tensor, n_tokens: int, scaling: float, decode: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token-granular read of full layer ``layer`` over its first ``n_tokens`` tokens: the
        selection (``retrieval.token_select``), read in place (``gather_tokens``) and attended in
        one softmax with the estimate of the tokens not read. Returns ``(out, lse)``: a decode
        step's output in the query's dtype (no lse; the step is counted), a prefill's part fp32. After a ``"retrieval"`` prefill with ``hold_selection``, decode steps read the
        tokens it chose plus sink and the recent window, without an estimate."""
        kv, index = self.kv, self.kv.tokens
        indexed = index.indexed[layer]
        plan = token_select.plan(self.config.retrieval, layer, n_tokens, indexed)
        held = self.held.get(layer) if decode and not plan.full else None
        sel = extra = None
        if plan.full:
            positions = torch.arange(n_tokens, device=query.device).expand(kv.rows, self.spec.kv_heads, -1)
        else:
            shared = self._prefix(plan)
            if held is not None:
                positions = torch.cat([shared.positions.view(kv.rows, self.spec.kv_heads, -1), held], 2)
            else:
                sel = token_select.select(plan, query, index, layer, shared, scaling)
                positions = sel.positions
                if self.hold_selection and not decode:
                    self.held[layer] = positions[:, :, positions.shape[2] - plan.retrieve :]
        keys, values, bias = gather_tokens(self.memory, kv.table, layer, positions)
        if sel is not None:
            if sel.missing is not None:
                bias = bias + sel.missing.to(bias.dtype)
            if self.estimated[layer]:
                extra = token_select.estimate(sel, shared, index, layer)
        out = token_attention(query, keys, values, bias, scaling, lse=not decode, softcap=self.spec.softcap,
                              out_dtype=None if decode else torch.float32, extra=extra)
        if decode:
            nbytes, heads = index.nbytes(layer), kv.rows * self.spec.kv_heads
            self.count.count(kv.rows, keys.shape[2], n_tokens,
                             (nbytes["codes"] + nbytes["codebooks"]) * heads if sel is not None else 0,
                             nbytes["runs"] * heads if extra is not None else 0)
        return out

    def _prefix(self, plan: token_select.TokenPlan) -> token_select.Prefix:
        """This step's ``Prefix`` (every full layer of a step has the same plan shape): computed by
        the first layer, reused by the others."""
        key = (plan, self.kv.rows, self.kv.table.tokens)
        if self._shared is None or self._shared[0] != key:
            self._shared = (key, token_select.prefix(plan, self.kv.table.bias, self.spec.kv_heads, self.kv.tokens.run,
                                                     self.kv.padded))
        return self._shared[1]

    def _unit_bias(self) -> torch.Tensor | None:
        return self.kv.index.bias if self.kv.padded else None

    def _source_layer(self, layer: int) -> int | None:
        """The selecting layer whose blocks ``layer`` reads (TidalDecode), or None."""
        chosen = self.config.retrieval.selection_layers
        if chosen is None or layer in chosen:
            return None
        below = [s for s in chosen if s < layer]
        return max(below) if below else None

    def read(self, layer: int, query: torch.Tensor, blocks: torch.Tensor, scaling: float, lse: bool = True,
             limit: int | None = None, lower: int | torch.Tensor | None = None, estimate: int | None = None,
             decode: bool = False, merged: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(out, lse)`` of ``query`` over ``blocks`` ``(rows, n)`` of ``layer``, as the memory's
        ``ReadPlan`` says: slots looked up, made resident at once, or streamed through the device
        slots in groups whose parts merge (``lse``: False skips it when there is a single part).
        ``limit``: read only tokens before it (a prefill reads the past while the first layer has
        already grown the table for its new tokens). ``lower``: the first position attended (a
        window): an int, ``(rows, 1, 1)``, or ``(rows, q_len, 1, 1)`` per query. ``estimate``: the
        context's tokens, whose whole blocks not read are estimated; ``decode``: a decode step's
        read (which always covers its last block); ``merged``: the caller merges the result with
        other parts (it stays fp32, to be rounded once after the merge)."""
        table = self.kv.table
        rows, n = blocks.shape
        bt = self.block_tokens
        pids = table.pids.gather(1, blocks)
        bias = table.bias.view(rows, -1, bt)[self._row_index, blocks]
        if (limit is not None and limit < table.tokens) or lower is not None:
            position = blocks[:, :, None] * bt + torch.arange(bt, device=blocks.device)
            if limit is not None and limit < table.tokens:
                bias = bias.masked_fill(position >= limit, float("-inf"))
            if lower is not None:
                if isinstance(lower, torch.Tensor) and lower.dim() == 4:  # one bias per query
                    position, bias = position[:, None], bias[:, None]
                bias = bias.masked_fill(position < lower, float("-inf"))
        extra = None
        if estimate and self.kv.estimates is not None and n < -(-estimate // bt):
            extra = self.kv.estimates.extra(layer, -(-estimate // bt), blocks, sealed=None if decode else estimate // bt)
        slab = self.memory.layer_slab(layer)
        softcap, out_dtype = self.spec.softcap, torch.float32 if merged else None
        residency = self.memory.residency
        plan = residency.read_plan(layer, rows, table.blocks)
        if plan.lookup:
            slots = residency.lookup(layer, pids)
            return paged_attention(query, slab, slots, bias, scaling, lse=lse, extra=extra, softcap=softcap,
                                   out_dtype=out_dtype)
        if n <= plan.group:
            slots = self.memory.resident(layer, pids.view(-1)).view(rows, n)
            return paged_attention(query, slab, slots, bias, scaling, lse=lse, extra=extra, softcap=softcap,
                                   out_dtype=out_dtype)
        parts = []
        for a in range(0, n, plan.group):
            slots = self.memory.resident(layer, pids[:, a : a + plan.group].reshape(-1)).view(rows, -1)
            parts.append(paged_attention(query, slab, slots, bias[..., a : a + plan.group, :], scaling,
                                         extra=extra if a == 0 else None, softcap=softcap, out_dtype=torch.float32))
        return merge_attention([p[0] for p in parts], [p[1] for p in parts], out_dtype or query.dtype)

    def _attend_new(self, query, keys, values, valid, scaling, softcap=None, window=None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention of the new tokens over themselves, in chunks of queries: one fp32
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
                ok = valid[:, None, lo:b] & (self.windows.arange(lo, b) >= first[:, a:b, None])  # (rows, b - a, b - lo)
            o, l = causal_attention(query[:, :, a:b], keys[:, :, lo:b], values[:, :, lo:b], ok, scaling,
                                    softcap=softcap, out_dtype=torch.float32)
            outs.append(o)
            lses.append(l)
        return (torch.cat(outs, dim=2), torch.cat(lses, dim=2)) if len(outs) > 1 else (outs[0], lses[0])
