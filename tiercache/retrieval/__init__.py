"""Block retrieval: unit summaries, the per-row unit index, and the per-step selector.

The decode path (``tiercache.hf.cache``) keeps one ``UnitIndex`` per batch and one ``Selector``::

    index.seal(layer, first_unit, keys, valid)    # post-RoPE keys of units that filled
    plan = selector.plan(layer, n_tokens)         # host integers: blocks read, sink, window, top
    ids = selector.select(plan, query, index.data[layer], index.ok)   # (rows, plan.read) blocks

Units: tokens, units of ``unit_tokens`` tokens, storage blocks of ``block_tokens`` tokens.
Measured quality: benchmarks/bench_retrieval.py.
"""

from .index import UnitIndex
from .selector import AGGREGATES, Plan, Selector, aggregate
from .summaries import LandmarkSummary, MeanSummary, MinMaxSummary, Summary, make_summary

__all__ = [
    "AGGREGATES",
    "LandmarkSummary",
    "MeanSummary",
    "MinMaxSummary",
    "Plan",
    "Selector",
    "Summary",
    "UnitIndex",
    "aggregate",
    "make_summary",
]
