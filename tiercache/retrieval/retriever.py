"""``Retriever``: the retrieval state of one model, and the one object the decode path calls.

Per layer and step the decode path (``tiercache.cache``) does::

    retriever.seal(seq, layer, first_block, keys)        # when blocks fill: keys post-RoPE
    sel = retriever.select(seq, layer, query, n_tokens)  # -> Selection: sel.indices (kv_heads, k)
    hint = retriever.prefetch(seq, layer)                # blocks to start fetching early, or None
    retriever.drop(seq)                                  # when the sequence ends

It knows nothing of tiers: it works on block indices per (sequence, layer).
"""

from __future__ import annotations

import torch

from ..config import RetrievalConfig
from ..errors import ShapeError
from .index import Index, make_index
from .predictor import PrefetchPredictor
from .selector import Selection, Selector
from .summaries import make_summary


class Retriever:
    """Indexes of every (sequence, layer), the selector and the prefetch predictor.

    ``block_tokens``: tokens per block; ``scaling``: the attention's softmax scale (default
    ``head_dim ** -0.5``); ``device``: where exact indexes keep summaries and score.
    """

    def __init__(
        self, config: RetrievalConfig, n_layers: int, kv_heads: int, head_dim: int, block_tokens: int,
        device: torch.device | str = "cpu", scaling: float | None = None,
    ) -> None:
        self.config = config
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.block_tokens = block_tokens
        self.device = torch.device(device)
        self.summary = make_summary(config.summary)
        self.selector = Selector(config, block_tokens, head_dim**-0.5 if scaling is None else scaling)
        self.predictor = PrefetchPredictor()
        self._indexes: dict[tuple[int, int], Index] = {}
        self._last: dict[tuple[int, int], Selection] = {}

    def index(self, seq: int, layer: int) -> Index:
        """The index of (``seq``, ``layer``), created empty on first use."""
        if not 0 <= layer < self.n_layers:
            raise ShapeError(f"layer {layer} out of range: the model has {self.n_layers} layers")
        key = (seq, layer)
        if key not in self._indexes:
            self._indexes[key] = make_index(
                self.config.index, self.summary, self.kv_heads, self.head_dim, self.device
            )
        return self._indexes[key]

    def seal(self, seq: int, layer: int, first_block: int, keys: torch.Tensor) -> None:
        """Index sealed blocks ``first_block, first_block + 1, ...`` of (``seq``, ``layer``) from
        their post-RoPE keys ``(kv_heads, tokens, head_dim)``, ``block_tokens`` tokens per block
        (a prefill seals many at once; only the last may be partial)."""
        summaries = self.summary.summarize(keys, self.block_tokens)
        self.index(seq, layer).add(range(first_block, first_block + summaries.shape[0]), summaries)

    def select(self, seq: int, layer: int, queries: torch.Tensor, n_tokens: int) -> Selection:
        """Blocks (``seq``, ``layer``) attends for ``queries`` (post-RoPE, ``(q_heads, head_dim)``
        or ``(1, q_heads, q_len, head_dim)``) at a context of ``n_tokens`` tokens."""
        plan = self.selector.plan(layer, n_tokens)
        source = self._source_layer(layer)
        reused = self._last.get((seq, source)) if source is not None and not plan.full else None
        if reused is not None and reused.n_blocks == plan.n_blocks:
            selection = reused
        else:
            selection = self.selector.select(self.index(seq, layer), queries, layer, n_tokens)
        self.predictor.score(seq, layer, selection)
        self._last[(seq, layer)] = selection
        if self.config.prefetch == "previous":
            self.predictor.guess(seq, layer, selection)
        elif self.config.prefetch == "next_layer" and layer + 1 < self.n_layers:
            guess = self.selector.select(self.index(seq, layer + 1), queries, layer + 1, n_tokens)
            self.predictor.guess(seq, layer + 1, guess)
        return selection

    def prefetch(self, seq: int, layer: int) -> Selection | None:
        """The predictor's guess of (``seq``, ``layer``)'s next selection, if it has one."""
        return self.predictor.guessed(seq, layer)

    def drop(self, seq: int) -> None:
        """Forget everything about sequence ``seq``."""
        for key in [k for k in self._indexes if k[0] == seq]:
            del self._indexes[key]
        for key in [k for k in self._last if k[0] == seq]:
            del self._last[key]
        self.predictor.drop(seq)

    def _source_layer(self, layer: int) -> int | None:
        """The selecting layer whose selection ``layer`` reuses (TidalDecode), or None."""
        chosen = self.config.selection_layers
        if chosen is None or layer in chosen:
            return None
        below = [s for s in chosen if s < layer]
        return max(below) if below else None
