"""Block retrieval: summaries, indexes, the per-step selector and the prefetch predictor.

The decode path uses ``Retriever`` (see ``tiercache.retrieval.retriever``); the pieces are
public for benchmarks and for callers that manage their own state.
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
