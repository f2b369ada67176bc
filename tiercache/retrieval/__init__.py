"""Block retrieval: summaries, indexes, the per-step selector and the prefetch predictor.

The decode path uses one ``Retriever`` per model (``tiercache.retrieval.retriever``)::

    r = Retriever(config.retrieval, n_layers, kv_heads, head_dim, block_tokens, device)
    r.seal(seq, layer, first_block, keys)     # post-RoPE keys (kv_heads, tokens, head_dim) of sealed blocks
    sel = r.select(seq, layer, query, n_tokens)  # query (q_heads, head_dim) or (1, q_heads, q_len, head_dim)
    sel.indices                               # (kv_heads, k) block indices, ascending
    sel.mask()                                # the same as a boolean (kv_heads, n_blocks)
    r.prefetch(seq, layer)                    # predicted next Selection of that layer, or None
    r.drop(seq)

Units: ``n_tokens`` and budgets in tokens; indices in blocks of ``block_tokens`` tokens of one
(sequence, layer). The pieces (``make_summary``, ``make_index``, ``Selector``,
``PrefetchPredictor``) are public for benchmarks and for callers that keep their own state.
Measured quality: benchmarks/bench_retrieval.py.
"""

from .index import AGGREGATES, ExactIndex, Index, aggregate, make_index
from .predictor import PrefetchPredictor
from .retriever import Retriever
from .selector import Plan, Selection, Selector, group_queries
from .summaries import LandmarkSummary, MeanSummary, MinMaxSummary, Summary, make_summary

__all__ = [
    "AGGREGATES",
    "ExactIndex",
    "Index",
    "LandmarkSummary",
    "MeanSummary",
    "MinMaxSummary",
    "PrefetchPredictor",
    "Plan",
    "Retriever",
    "Selection",
    "Selector",
    "Summary",
    "aggregate",
    "group_queries",
    "make_index",
    "make_summary",
]
