"""What a piece of torch code costs a GPU before any data moves: aten ops and host syncs.

Every aten op is a kernel launch on a GPU (about 5 us of launch and Python overhead each), and a
host sync (``.item()``, ``.tolist()``, ``nonzero``, ``unique``, a boolean-mask index, ...) drains
the GPU's queue and waits for it. ``OpCounter`` counts both while it is active; it works on the
CPU too, so the decode path's GPU shape is checked by CPU tests and benchmarks.

    with OpCounter() as c:
        model(next_token, past_key_values=cache)
    c.ops, c.syncs, c.sync_ops          # totals, and the ops that synced

``Tensor.tolist`` and ``Tensor.numpy`` read data without dispatching an op, so they are wrapped
while a counter is active and counted as syncs.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
#: Ops whose result (a value or an output shape) depends on tensor data, so the host must wait.
SYNC_OPS = frozenset(
    op for op in (
        getattr(_aten, name, None)
        for name in ("_local_scalar_dense", "nonzero", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                     "unique_dim_consecutive", "masked_select", "bincount", "is_nonzero", "equal")
    ) if op is not None
)
#: Ops that sync when an index is a boolean mask (they compute its nonzero positions).
_MASK_INDEXED = frozenset({_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_})
#: Ops that are views or metadata only: no kernel runs (counted apart, never as launches).
_FREE = frozenset({"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "select", "slice",
                   "unsqueeze", "squeeze", "as_strided", "alias", "detach", "unbind", "split", "chunk",
                   "split_with_sizes", "narrow", "diagonal", "view_as", "unfold", "_reshape_alias", "lift_fresh",
                   "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "stride",
                   "is_contiguous", "numel", "_to_copy_noop"})


class OpCounter(TorchDispatchMode):
    """Counts aten ops (``ops``: all; ``kernels``: those that are not views) and host syncs
    (``syncs``) dispatched while active; ``by_op`` and ``sync_ops`` say which."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.sync_ops: Counter[str] = Counter()
        self._saved: dict[str, object] = {}

    @property
    def ops(self) -> int:
        """Aten ops dispatched, views included."""
        return sum(self.by_op.values())

    @property
    def kernels(self) -> int:
        """Aten ops that launch work (not views or metadata)."""
        return sum(n for name, n in self.by_op.items() if name.split(".")[0] not in _FREE)

    @property
    def syncs(self) -> int:
        """Host syncs: data-dependent ops plus ``tolist`` / ``numpy`` reads."""
        return sum(self.sync_ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.by_op[name] += 1
        if func.overloadpacket in SYNC_OPS or _unsized_repeat(func, args, kwargs) or (
            func.overloadpacket in _MASK_INDEXED and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in _indices(func, args, kwargs))
        ):
            self.sync_ops[name] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        counter = self
        for method in ("tolist", "numpy"):
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def wrapped(tensor, *a, _original=original, _name=method, **k):
                counter.sync_ops[_name] += 1
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, method, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved.clear()
        return super().__exit__(*exc)


def _unsized_repeat(func, args, kwargs) -> bool:
    """``repeat_interleave`` with tensor repeats and no ``output_size``: its size depends on data."""
    return (func.overloadpacket is _aten.repeat_interleave and func._overloadname != "self_int"
            and kwargs.get("output_size") is None)


def _indices(func, args, kwargs) -> list:
    """The index tensors of an ``index`` / ``index_put`` call."""
    indices = kwargs.get("indices", args[1] if len(args) > 1 else ())
    return [i for i in indices if i is not None] if isinstance(indices, (list, tuple)) else []
