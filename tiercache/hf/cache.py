"""transformers integration: ``TieredCache``, a ``Cache`` whose KV lives in tiercache's tiers.

transformers calls ``Cache.update(key, value, layer_idx)`` and then the model's attention function
with the query; ``update`` never sees the query, so the work happens in the ``"tiercache"``
attention function (``tiercache.hf.attention``), which the model runs only for forwards that use a
TieredCache: it hands the query and the layer's new keys and values to ``TieredCache.attend``,
which runs the layer's ``DecodeStep`` (``tiercache.decode.step``: write, plan, select, resident,
attend). The mask that arrives is the 2-D padding mask, so the step knows which new tokens are
padding.

**generate's Cache methods.** Beam search (``reorder_cache``), ``batch_repeat_interleave`` and
``batch_select_indices`` rewrite the rows of the block table: rows share their blocks, and only
the open block of a row that now shares it is copied (copy-on-write); the unit summaries are
per row and are copied. ``crop`` (assisted and prompt-lookup decoding) forgets the last tokens.
All of it is host bookkeeping between forwards, outside the decode step's tensor pipeline.

Keys are cached after RoPE (transformers applies it before ``update``), so a subset of blocks needs
no re-rotation. The cache is for inference: nothing it stores carries gradients.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Iterable

import numpy as np
import torch
from transformers.cache_utils import Cache

from ..config import TierConfig
from ..decode.accounting import CacheStats
from ..decode.step import PREFILL_MODES, DecodeStep
from ..errors import ConfigError, ShapeError, UnsupportedModelError
from ..tiers.manager import TierManager
from .attention import ATTN_NAME, attach, note_update
from .families import model_spec

__all__ = ["ATTN_NAME", "PREFILL_MODES", "TieredCache", "default_config", "wrap"]


class TieredCache(Cache):
    """A transformers ``Cache`` whose KV lives in tiercache's tiers.

    ``TieredCache(model, config)`` builds a ``TierManager`` for the model's KV geometry. Use it
    as ``past_key_values`` of ``model(...)`` or ``model.generate(...)`` (every decoding strategy:
    greedy, sampling, beam search, assisted and prompt-lookup decoding). The model is switched to
    the ``"tiercache"`` attention function only for the forwards that use a TieredCache (a hook
    on its base module, ``hf.attention.attach``), and put back on its own implementation at the end
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
        self.spec = model_spec(model)
        self.model_config = model.config
        self.config = config or default_config(model)
        self.layout = self.config.layout(self.spec.kv_heads, self.spec.head_dim, model.dtype)
        if self.layout.dtype != model.dtype:
            raise ConfigError(f"config dtype {self.layout.dtype} differs from the model's {model.dtype}")
        self.manager = TierManager(self.config, self.layout, self.spec.layers)
        #: The decode step: what the batch has cached (``step.kv``) and the attention over it.
        self.step = DecodeStep(self.spec, self.config, self.manager, prefill)
        self._received: dict[int, torch.Tensor] = {}  # layer -> keys update() got, until attend()
        self._model = weakref.ref(model)
        attach(model, TieredCache)

    @property
    def prefill(self) -> str:
        """How a forward of several new tokens attends the cached ones (class docstring)."""
        return self.step.prefill

    @prefill.setter
    def prefill(self, mode: str) -> None:
        if mode not in PREFILL_MODES:
            raise ConfigError(f"prefill must be one of {PREFILL_MODES}, got {mode!r}")
        self.step.prefill = mode

    @property
    def hold_selection(self) -> bool:
        """After a ``"retrieval"`` prefill (a question), decode steps read the blocks that prefill
        chose (plus sink and the recent window) instead of selecting anew (ReKV)."""
        return self.step.hold_selection

    @hold_selection.setter
    def hold_selection(self, hold: bool) -> None:
        self.step.hold_selection = hold

    @property
    def estimated(self) -> tuple[bool, ...]:
        """Per layer: whether its reads add the estimate of the blocks they skip."""
        return self.step.estimated

    # ------------------------------------------------------------ Cache API

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Note this forward's keys and values ``(batch, kv_heads, new_tokens, head_dim)`` of
        layer ``layer_idx`` for the attention function (``received``, then ``attend``, which caches
        them); returns them unchanged."""
        b, h, _, d = key_states.shape
        spec = self.spec
        if (h, d) != (spec.kv_heads, spec.head_dim) or key_states.shape != value_states.shape:
            raise ShapeError(f"layer {layer_idx}: keys {tuple(key_states.shape)} / values "
                             f"{tuple(value_states.shape)} do not match the cache's {spec.kv_heads} KV heads "
                             f"x {spec.head_dim} dims: was this cache built for another model?")
        if self.step.kv.table is None:
            self.step.start(b)
        elif b != self.step.kv.rows:
            raise ShapeError(f"batch of {b} sequences, but this cache holds {self.step.kv.rows}")
        self._received[layer_idx] = key_states
        note_update(self)
        return key_states, value_states

    def received(self, layer: int, keys: torch.Tensor) -> bool:
        """Whether ``keys`` are the keys ``update`` just got for ``layer`` (the attention call
        that follows belongs to this cache)."""
        return self._received.get(layer) is keys

    def attend(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """The attention output ``(batch, q_len, q_heads, head_dim)`` of ``layer`` for ``query``
        over the cached tokens and the new ``keys`` / ``values`` that ``update`` received, which
        it then caches (``DecodeStep.attend``). ``mask``: the 2-D padding mask, or None."""
        del self._received[layer]
        return self.step.attend(layer, query, keys, values, mask, scaling)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached for layer ``layer_idx`` (padding included): every token ever seen."""
        return self.step.kv.lengths[layer_idx]

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for transformers' mask functions: every cached token plus the
        query, offset 0, for every mask kind (full, sliding, chunked). The ``"tiercache"`` mask is
        the 2-D padding mask as given; causality and windows are the attention's."""
        return self.get_seq_length(layer_idx) + query_length, 0

    def __len__(self) -> int:
        """Layers of the model (transformers: one cache layer per model layer)."""
        return self.spec.layers

    @property
    def is_compileable(self) -> bool:
        return False

    # transformers' Cache derives these per-layer lists from its layer objects, which TieredCache
    # does not keep; generate reads them (5.24 feeds a cache whose is_linear is all True, as
    # ``[]`` is, every input token again).
    @property
    def is_sliding(self) -> list[bool]:
        """Per layer: whether it attends a window (sliding or chunked)."""
        return [window is not None for window in self.spec.windows]

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: whether it is a linear-attention layer (never, in the supported families)."""
        return [False] * self.spec.layers

    @property
    def is_dummy(self) -> list[bool]:
        """Per layer: whether it stores nothing (shares another layer's KV; never, here)."""
        return [False] * self.spec.layers

    @property
    def batch_size(self) -> int:
        """Rows of the batch, -1 before the first forward."""
        return self.step.kv.rows if self.step.kv.table is not None else -1

    @property
    def is_croppable(self) -> bool:
        """``crop`` puts the cache back exactly: windowed layers keep their older blocks too."""
        return True

    @property
    def attended_fraction(self) -> float:
        """Tokens decode steps read over tokens cached, summed over layers and steps (1.0 before
        any decode step)."""
        return self.step.count.attended_fraction

    def stats(self) -> CacheStats:
        """The tiers' counters, and what decode steps read and touched, with the device bytes of
        every structure (``tiercache.decode.accounting.CacheStats``; reads the device counters:
        one sync)."""
        count = self.step.count
        return CacheStats(self.manager.stats(), count.attended_fraction, count.touched_fraction, count.index_bytes,
                          count.estimate_bytes, count.exact_bytes, count.dense_bytes, self.step.resident_bytes())

    def reset(self) -> None:
        """Forget every cached token (and the batch size: the next forward may use another)."""
        self.step.reset()
        self._received.clear()

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

    def truncate(self, tokens: int) -> None:
        """Forget every cached token past the first ``tokens`` of every row (undo a question asked
        of a stream, ``crop``). The block that becomes the last is reopened: pinned, written in
        place, one per row (rows that shared it get their own copy)."""
        if self._received:
            self.step.kv.check_settled("truncate", pending=True)
        self.step.cut(tokens)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row ``r`` becomes old row ``beam_idx[r]``. Rows share their blocks; a row
        that now shares its open block gets a copy of it (copy-on-write); summaries are copied.
        One host sync (reading ``beam_idx``), between forwards."""
        self._reorder(beam_idx.detach().cpu().numpy(), "reorder_cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row becomes ``repeats`` consecutive rows (sharing its blocks). ``ConfigError``,
        with nothing changed, if the device budget cannot hold that many rows."""
        if self.step.kv.table is not None:
            self._reorder(np.repeat(np.arange(self.step.kv.rows), repeats), "batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (integer indices or a boolean mask), in that order."""
        if self.step.kv.table is not None:
            picked = torch.as_tensor(indices).detach().cpu().numpy()
            self._reorder(np.arange(self.step.kv.rows)[picked], "batch_select_indices")

    def _reorder(self, index: np.ndarray, what: str) -> None:
        if self._received:
            self.step.kv.check_settled(what, pending=True)
        self.step.reorder(index, what)

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
        kv = self.step.kv
        if kv.table is not None and kv.lengths[0]:
            kv.check_settled("copy", pending=bool(self._received))
            valid = kv.table.valid(0, kv.lengths[0])
            twin.step.start(kv.rows)
            with torch.no_grad():
                for layer in range(self.spec.layers):
                    part = kv.layer_kv(layer).to(twin.manager.device)    # (rows, 2, H, n, D)
                    twin.step.kv.append(layer, part[:, 0], part[:, 1], valid.to(twin.manager.device))
        twin.step.held = {layer: held.clone() for layer, held in self.step.held.items()}
        twin.step.count = dataclasses.replace(self.step.count)
        return twin

    def export_kv(self, seq: int = 0) -> torch.Tensor:
        """The whole cache of row ``seq`` as ``(layers, 2, kv_heads, tokens, head_dim)`` on the
        CPU (blocks are read from whichever tier holds them)."""
        kv, spec = self.step.kv, self.spec
        n = kv.lengths[0]
        if any(x != n for x in kv.lengths):
            raise ShapeError(f"row {seq}: layers hold different numbers of tokens; finish the forward first")
        out = torch.empty((spec.layers, 2, spec.kv_heads, n, spec.head_dim), dtype=self.layout.dtype)
        if not n:
            return out
        for layer in range(spec.layers):
            out[layer] = kv.layer_kv(layer, slice(seq, seq + 1))[0].cpu()
        return out

    def import_kv(self, kv: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Fill an empty cache of one row, without any prefill: blocks are written to the tiers
        and units summarised. ``kv``: ``(layers, 2, kv_heads, tokens, head_dim)`` as ``export_kv``
        or a saved context gives it, or an iterable of each layer's ``(2, kv_heads, tokens,
        head_dim)`` in order (so a context larger than host memory at once can stream in)."""
        spec, state = self.spec, self.step.kv
        expected = (spec.layers, 2, spec.kv_heads, spec.head_dim)
        if isinstance(kv, torch.Tensor) and (kv.dim() != 5 or (*kv.shape[:3], kv.shape[4]) != expected):
            raise ShapeError(f"import_kv: shape {tuple(kv.shape)} does not match (layers={spec.layers}, 2, "
                             f"kv_heads={spec.kv_heads}, tokens, head_dim={spec.head_dim}) of this model")
        if any(state.lengths):
            raise ShapeError("import_kv: the cache already holds tokens; import into an empty cache")
        if state.table is None:
            self.step.start(1)
        device = self.manager.device
        try:
            with torch.no_grad():
                for layer, part in enumerate(kv):
                    if layer >= spec.layers or part.dim() != 4 or part.shape[:2] != (2, spec.kv_heads) \
                            or part.shape[3] != spec.head_dim or (layer and part.shape[2] != state.lengths[0]):
                        raise ShapeError(f"import_kv: layer {layer} has shape {tuple(part.shape)}, expected (2, "
                                         f"kv_heads={spec.kv_heads}, {state.lengths[0] or 'tokens'}, "
                                         f"head_dim={spec.head_dim}) for one of {spec.layers} layers")
                    state.append(layer, part[0][None].to(device), part[1][None].to(device), None)
            if len(set(state.lengths)) != 1:
                raise ShapeError(f"import_kv: got {sum(1 for n in state.lengths if n)} layers, the model has "
                                 f"{spec.layers}")
        except BaseException:
            self.reset()  # nothing half-imported stays behind
            raise

    def check_layer(self, layer: int, sliding_window: int | None, softcap: float | None) -> None:
        """``UnsupportedModelError`` unless the sliding window and the soft-capping an attention
        module asks for (its ``sliding_window`` and ``softcap`` arguments; None for full and
        chunked layers, and for no capping) are what this cache read from the model's config
        (``self.spec``): a mismatch would be silently wrong attention."""
        window = self.spec.windows[layer]
        expected = window.tokens if window is not None and window.kind == "sliding" else None
        if sliding_window != expected or softcap != self.spec.softcap:
            raise UnsupportedModelError(
                f"layer {layer} attends with sliding_window={sliding_window}, softcap={softcap}, but its config "
                f"reads as {window or 'full attention'}, softcap={self.spec.softcap}: this model's layers are not "
                "what tiercache.hf.families expects")


def default_config(model, context_tokens: int = 8192, device_fraction: float = 0.25) -> TierConfig:
    """A config for ``model`` sized for ``context_tokens`` tokens: the device holds
    ``device_fraction`` of that KV (at least the minimum the model needs, and the widest window of
    its windowed layers, so a window stays on the device), the host all of it."""
    spec = model_spec(model)
    total = spec.kv_bytes_per_token(model.dtype) * context_tokens
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
