"""Retrieval: which blocks a decode step reads.

- ``summaries``: how a unit of tokens is summarised for scoring (mean key, Quest min/max,
  landmarks), from its post-RoPE keys;
- ``index.UnitIndex``: every layer's unit summaries, per row, on the device;
- ``estimate.BlockEstimates``: each sealed block's mean key and value, which stand in for the
  blocks a step does not read;
- ``selector.Selector``: a step's read plan (host integers) and its selection (tensors);
- ``evaluate``: recall of attention mass and output error of a selection, for benchmarks.

The decode step (``tiercache.decode.step``) uses them as::

    plan = selector.plan(layer, n_tokens)          # blocks read, sink, window, units ranked
    blocks = selector.select(plan, query, index.data[layer], unit_bias, scaling)   # (rows, read)

Units: tokens, units of ``unit_tokens`` tokens, storage blocks of ``block_tokens`` tokens.
Measured quality: benchmarks/bench_retrieval.py.
"""
