"""transformers integration: ``TieredCache`` and the ``"tiercache"`` attention function.

transformers calls ``Cache.update(key, value, layer_idx)`` and then the model's attention function
with the query; ``update`` never sees the query, so the work happens in the attention function
(registered with ``AttentionInterface`` as ``"tiercache"``): ``update`` only hands this step's new
keys and values over, and the attention function

1. attends the query to the cached blocks: every block during a full prefill, or sink + window +
   the blocks retrieval picks (per KV head) during decode, streaming the blocks through the device
   pool in groups so the device never holds more than its budget;
2. attends causally to the new keys and values themselves;
3. merges both parts exactly by log-sum-exp;
4. writes the new keys and values into the tiers: the open block of each sequence and layer is
   pinned on the device, a block that fills is sealed (indexed for retrieval) and may then be
   demoted. The first ``sink_tokens`` stay pinned.

The mask interface does not know ``"tiercache"``, so transformers builds no mask and causality is
this module's job. Padding masks are not supported: a batch's sequences must have equal lengths.
Keys are cached after RoPE (transformers applies it before ``update``), so a subset of blocks needs
no re-rotation.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from .blocks import BlockKey
from .config import TierConfig
from .errors import ConfigError, ShapeError, UnsupportedModelError
from .kernels.attention import block_sparse_attention, merge_attention
from .manager import TierManager
from .retrieval.retriever import Retriever
from .retrieval.selector import storage_blocks

ATTN_NAME = "tiercache"
#: Model types whose attention modules follow the Llama layout (q/k/v projections, RoPE before the
#: cache update, ``layer_idx`` and ``num_key_value_groups`` on the module).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: Queries attended to the new tokens per chunk: bounds the (q_heads, chunk, tokens) score tensor.
_QUERY_CHUNK = 512
PREFILL_MODES = ("full", "window", "retrieval")

_active = threading.local()


class TieredCache(Cache):
    """A transformers ``Cache`` whose KV lives in tiercache's tiers.

    ``TieredCache(model, config)`` switches ``model`` to the ``"tiercache"`` attention function
    (which behaves like plain causal attention for any other cache) and builds a ``TierManager``
    for the model's KV geometry. Use it as ``past_key_values`` of ``model(...)`` or
    ``model.generate(...)``.

    ``prefill``: how a forward of several new tokens attends the tokens cached before it:
    ``"full"`` (every block: exact), ``"window"`` (sink + recent window only: constant cost per
    chunk, for streams) or ``"retrieval"`` (sink + window + the blocks the chunk's queries pick:
    a question over a long stream). Decode steps (one new token) always use retrieval. The
    attribute may be changed between forwards.
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
        #: After a ``"retrieval"`` prefill (a question), decode steps read the blocks that
        #: prefill ranked (plus sink and the recent window) instead of selecting anew each step
        #: (ReKV). The held selections are dropped by ``truncate``, ``reset`` and the next prefill.
        self.hold_selection = False
        self._held: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
        self.manager = TierManager(self.config, self.layout)
        bt = self.layout.block_tokens
        #: Tokens per selection unit: retrieval indexes and picks units; storage moves blocks.
        self.unit = self.config.retrieval.unit_tokens or bt
        self.retriever = Retriever(self.config.retrieval, self.n_layers, self.kv_heads, self.head_dim,
                                   self.unit, self.config.device)
        self.sink_blocks = math.ceil(self.config.retrieval.sink_tokens / bt)
        self._check_room()
        self._lengths: list[list[int]] = []  # [seq][layer] tokens cached
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
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
        if not self._lengths:
            self._lengths = [[0] * self.n_layers for _ in range(b)]
        elif b != len(self._lengths):
            raise ShapeError(f"batch of {b} sequences, but this cache holds {len(self._lengths)}")
        self._pending[layer_idx] = (key_states, value_states)
        _active.cache = weakref.ref(self)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached for layer ``layer_idx`` (of the first sequence): every token ever seen."""
        return self._lengths[0][layer_idx] if self._lengths else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        """Forget every cached token."""
        for seq in range(len(self._lengths)):
            self.manager.drop(seq)
            self.retriever.drop(seq)
        self._lengths = []
        self._pending.clear()
        self._held.clear()

    def close(self) -> None:
        """Stop the manager's prefetch worker and close the tiers it built (the disk tier's
        store releases its writer lock, so another process can open it)."""
        self.manager.close()

    def truncate(self, tokens: int) -> None:
        """Forget every cached token past the first ``tokens`` of every sequence and layer (undo a
        question asked of a stream). The block that becomes the last is reopened (pinned, unindexed)."""
        bt = self.layout.block_tokens
        keep_blocks = math.ceil(tokens / bt)
        self._held.clear()
        for seq, lengths in enumerate(self._lengths):
            for layer, n in enumerate(lengths):
                if tokens >= n:
                    continue
                gone = [BlockKey(seq, layer, i) for i in range(keep_blocks, math.ceil(n / bt))]
                self.manager.remove(gone)
                unindex = list(range(tokens // self.unit, n // self.unit))
                if unindex:
                    self.retriever.index(seq, layer).remove(unindex)
                if tokens % bt:
                    last = BlockKey(seq, layer, keep_blocks - 1)
                    k, v = self.manager.get([last])
                    r = tokens % bt
                    self.manager.put(last, k[0, :, :r].clone(), v[0, :, :r].clone(), pinned=True)
                lengths[layer] = tokens

    def export_kv(self, seq: int = 0) -> torch.Tensor:
        """The whole cache of sequence ``seq`` as ``(layers, 2, kv_heads, tokens, head_dim)`` on the
        CPU (blocks are read from whichever tier holds them, a device-budget's worth at a time)."""
        lengths = self._lengths[seq] if self._lengths else [0]
        n = lengths[0]
        if any(x != n for x in lengths):
            raise ShapeError(f"sequence {seq}: layers hold different numbers of tokens; finish the forward first")
        bt = self.layout.block_tokens
        out = torch.empty((self.n_layers, 2, self.kv_heads, n, self.head_dim), dtype=self.layout.dtype)
        group = max(1, self.manager.max_get_blocks() - 1)
        for layer in range(self.n_layers):
            blocks = list(range(math.ceil(n / bt)))
            for start in range(0, len(blocks), group):
                chunk = blocks[start : start + group]
                k, v = self.manager.get([BlockKey(seq, layer, i) for i in chunk])
                a, b = chunk[0] * bt, min(n, (chunk[-1] + 1) * bt)
                out[layer, 0, :, a:b] = k.transpose(0, 1).reshape(self.kv_heads, -1, self.head_dim)[:, : b - a].cpu()
                out[layer, 1, :, a:b] = v.transpose(0, 1).reshape(self.kv_heads, -1, self.head_dim)[:, : b - a].cpu()
        return out

    def import_kv(self, kv: torch.Tensor, seq: int = 0) -> None:
        """Fill an empty cache for sequence ``seq`` (of a batch of one) from ``(layers, 2,
        kv_heads, tokens, head_dim)``, as ``export_kv`` or a saved context gives it, without any
        prefill: blocks are written to the tiers and sealed blocks indexed."""
        expected = (self.n_layers, 2, self.kv_heads, self.head_dim)
        if kv.dim() != 5 or (kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[4]) != expected:
            raise ShapeError(f"import_kv: shape {tuple(kv.shape)} does not match (layers={self.n_layers}, 2, "
                             f"kv_heads={self.kv_heads}, tokens, head_dim={self.head_dim}) of this model")
        if self._lengths and any(self._lengths[seq]):
            raise ShapeError(f"import_kv: sequence {seq} already holds tokens; import into an empty cache")
        if not self._lengths:
            self._lengths = [[0] * self.n_layers]
        device = self.manager.device
        for layer in range(self.n_layers):
            self._append(seq, layer, kv[layer, 0].to(device), kv[layer, 1].to(device))

    # ------------------------------------------------------------ attention

    def attend(self, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention output ``(batch, q_len, q_heads, head_dim)`` of ``query`` ``(batch, q_heads,
        q_len, head_dim)`` over the cached tokens of ``layer`` and this step's new ones, which it
        then caches."""
        keys, values = self._pending.pop(layer)
        out = torch.empty_like(query)
        for seq in range(query.shape[0]):
            past = self._lengths[seq][layer]
            q = query[seq]
            if past:
                parts = [self._attend_new(q, keys[seq], values[seq], scaling),
                         *self._attend_cached(seq, layer, q, past, scaling)]
                out[seq] = merge_attention([p[0] for p in parts], [p[1] for p in parts])[0]
            else:
                # Nothing cached yet: plain causal attention, no log-sum-exp needed for a merge.
                out[seq] = _causal_attention(q[None], keys[seq][None], values[seq][None], None, scaling)[0].transpose(0, 1)
            self._append(seq, layer, keys[seq], values[seq])
        return out.transpose(1, 2)

    def _attend_new(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
        """Causal attention of ``q`` (q_heads, L, D) over the L new tokens; (out, lse)."""
        n = k.shape[1]
        bt = self.layout.block_tokens
        nb = math.ceil(n / bt)
        pad = nb * bt - n
        kb = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(self.kv_heads, nb, bt, self.head_dim).transpose(0, 1)
        vb = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(self.kv_heads, nb, bt, self.head_dim).transpose(0, 1)
        lens = torch.full((nb,), bt, dtype=torch.long, device=k.device)
        lens[-1] = bt - pad
        outs, lses = [], []
        for start in range(0, n, _QUERY_CHUNK):
            stop = min(n, start + _QUERY_CHUNK)
            blocks = math.ceil(stop / bt)  # keys a query chunk can see end with its last query
            mask = torch.ones(self.kv_heads, blocks, dtype=torch.bool, device=k.device)
            o, lse = block_sparse_attention(q[:, start:stop], kb[:blocks], vb[:blocks], mask, lens[:blocks],
                                            scaling, causal_from=start)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs, dim=1), torch.cat(lses, dim=1)

    def _attend_cached(self, seq: int, layer: int, q: torch.Tensor, past: int, scaling: float):
        """Partial attentions (out, lse) of ``q`` over the ``past`` cached tokens of (seq, layer)."""
        bt, unit = self.layout.block_tokens, self.unit
        per_block = bt // unit
        n_units = math.ceil(past / unit)
        decode = q.shape[1] == 1
        mode = "retrieval" if decode else self.prefill
        if not decode:
            self._held.pop((seq, layer), None)
        held = self._held.get((seq, layer)) if decode else None
        full = mode == "full" or layer in self.config.retrieval.full_attention_layers
        selected = torch.zeros(self.kv_heads, math.ceil(past / bt) * per_block, dtype=torch.bool, device=q.device)
        if full or mode == "window":
            units = (torch.arange(n_units, device=q.device).expand(self.kv_heads, n_units) if full
                     else self._window_units(n_units, q.device))
            selected.scatter_(1, units, True)
            blocks = (units // per_block).unique().tolist()
        else:
            if held is not None:
                # The question's picks, with sink + window of the grown context (question, answer).
                ranked, k = held
            else:
                # Every query position of the chunk scores the units, like extra query heads.
                sel = self.retriever.select(seq, layer, q.unsqueeze(0), past)
                ranked, k = sel.ranked, sel.k
                if not decode and self.hold_selection:
                    self._held[(seq, layer)] = (ranked, k)
            chosen = self._blocks_to_read(ranked, k, past)
            selected.view(self.kv_heads, -1, per_block)[:, chosen] = True
            blocks = chosen.tolist()
        if mode == "retrieval":
            self.manager.record_selection(BlockKey(seq, layer, i) for i in blocks)
            self._prefetch_next_layer(seq, layer)
        # Stream the blocks through the device in groups that fit beside the pinned ones.
        group = max(1, self.manager.max_get_blocks() - 1)
        parts = []
        for start in range(0, len(blocks), group):
            chunk = blocks[start : start + group]
            keys = [BlockKey(seq, layer, i) for i in chunk]
            k, v = self.manager.get(keys)
            # Split each block into its units: the kernel masks whole (sub-)blocks per head.
            k, v = (x.view(len(chunk), self.kv_heads, per_block, unit, self.head_dim).transpose(1, 2)
                    .reshape(-1, self.kv_heads, unit, self.head_dim) for x in (k, v))
            offsets = torch.arange(per_block, device=q.device) * unit
            block_len = torch.tensor(self.manager.tokens(keys), dtype=torch.long, device=q.device)
            lens = (block_len[:, None] - offsets).clamp(0, unit).reshape(-1)
            ids = (torch.tensor(chunk, device=q.device)[:, None] * per_block + torch.arange(per_block, device=q.device))
            parts.append(block_sparse_attention(q, k, v, selected[:, ids.reshape(-1)], lens, scaling))
        return parts

    def _prefetch_next_layer(self, seq: int, layer: int) -> None:
        """Start moving the predictor's guess for the next layer to the device while this layer
        computes."""
        guess = self.retriever.prefetch(seq, layer + 1) if layer + 1 < self.n_layers else None
        if guess is not None:
            blocks = self._blocks_to_read(guess.ranked, guess.k, self._lengths[seq][layer + 1]).tolist()
            self.manager.prefetch(BlockKey(seq, layer + 1, i) for i in blocks)

    def _blocks_to_read(self, ranked: torch.Tensor, k: int, past: int) -> torch.Tensor:
        """Storage blocks (ascending) a retrieval step over ``past`` cached tokens reads, for the
        heads' ``ranked`` units and ``k`` units per head: sink and window blocks, then the voted
        ones, ``read_factor`` times the budget in all."""
        per_block = self.layout.block_tokens // self.unit
        forced = (self._window_units(math.ceil(past / self.unit), ranked.device)[0] // per_block).unique()
        reads = math.ceil(self.config.retrieval.read_factor * k / per_block)
        return storage_blocks(ranked, per_block, math.ceil(past / self.layout.block_tokens), forced, reads)

    def _window_units(self, n_units: int, device: torch.device) -> torch.Tensor:
        """Sink and recent-window unit indices, the same for every KV head."""
        cfg = self.config.retrieval
        sink = math.ceil(cfg.sink_tokens / self.unit)
        window = math.ceil(cfg.window_tokens / self.unit) or 1
        idx = sorted(set(range(min(sink, n_units))) | set(range(max(0, n_units - window), n_units)))
        return torch.tensor(idx, device=device).expand(self.kv_heads, len(idx))

    def _append(self, seq: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new keys and values ``(kv_heads, n, head_dim)`` into the blocks of (seq, layer)."""
        bt = self.layout.block_tokens
        n = start = self._lengths[seq][layer]
        pos, total = 0, k.shape[1]
        while pos < total:
            index, offset = divmod(n, bt)
            take = min(bt - offset, total - pos)
            key = BlockKey(seq, layer, index)
            kk, vv = k[:, pos : pos + take].to(self.layout.dtype), v[:, pos : pos + take].to(self.layout.dtype)
            sealed = offset + take == bt
            sink = index < self.sink_blocks
            if offset == 0:
                self.manager.put(key, kk, vv, pinned=sink or not sealed)
            else:
                self.manager.append(key, kk, vv)
            if sealed and offset and not sink:
                self.manager.unpin([key])
            n += take
            pos += take
        self._lengths[seq][layer] = n
        self._seal_units(seq, layer, start, k)

    def _seal_units(self, seq: int, layer: int, before: int, new_keys: torch.Tensor) -> None:
        """Index the selection units completed by appending ``new_keys`` after ``before`` tokens."""
        first, last = before // self.unit, self._lengths[seq][layer] // self.unit
        if first == last:
            return
        keys = new_keys[:, : last * self.unit - before].to(self.layout.dtype)
        carry = before - first * self.unit  # tokens of the first unit cached by an earlier append
        if carry:
            bt = self.layout.block_tokens
            block, offset = divmod(first * self.unit, bt)
            cached = self.manager.get([BlockKey(seq, layer, block)])[0][0, :, offset : offset + carry]
            keys = torch.cat([cached, keys], dim=1)
        self.retriever.seal(seq, layer, first, keys)

    def _check_room(self) -> None:
        """The device must hold, per sequence and layer, the sink blocks and an open block, plus
        room to stream at least one more block."""
        need = self.n_layers * (self.sink_blocks + 1) + 1
        if self.manager.pool.num_slots < need:
            raise ConfigError(
                f"device_budget_bytes={self.config.device_budget_bytes} holds {self.manager.pool.num_slots} "
                f"blocks of {self.layout.nbytes} bytes; this model needs at least {need} "
                f"({self.n_layers} layers x ({self.sink_blocks} sink + 1 open block) + 1) per sequence, i.e. "
                f"{need * self.layout.nbytes} bytes"
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
    minimum = block * (mcfg.num_hidden_layers * (math.ceil(probe.retrieval.sink_tokens / probe.block_tokens) + 1) + 8)
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


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``"tiercache"`` attention function: TieredCache's sparse attention when the cache that
    just received this layer's keys is a TieredCache, plain causal attention otherwise."""
    ref = getattr(_active, "cache", None)
    cache = ref() if ref is not None else None
    scaling = module.scaling if scaling is None else scaling
    if cache is not None and module.layer_idx in cache._pending and cache._pending[module.layer_idx][0] is key:
        return cache.attend(module.layer_idx, query, scaling), None
    return _causal_attention(query, key, value, attention_mask, scaling), None


def _causal_attention(query, key, value, attention_mask, scaling):
    """Causal SDPA with the queries aligned to the last keys (they follow any cached ones)."""
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    else:
        mask = attention_mask
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2)


AttentionInterface.register(ATTN_NAME, _attention)
