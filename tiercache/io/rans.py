"""rANS entropy coding of integer symbols in classes, via ``constriction``.

Symbols are signed integers. Each *row* (e.g. one channel of one head over a block's tokens) gets
a *class* from the mean absolute value of its symbols: class ``c`` models a discrete Laplace
distribution of scale ``b_c = 2**(c/2) / 8`` over ``[-A_c, A_c]``. Symbols outside that range are
*escapes*: coded as ``±A_c`` in the stream, their exact values kept beside it by the caller. Rows
whose symbols are all zero get ``ZERO_CLASS`` and cost nothing in the stream.

Two kinds of tables:
- shared: the Laplace table of the class, computed from the class index alone; nothing stored.
- block: the class's empirical histogram in this block, stored as ``i16 lo, u16 n, u8 counts[n]``;
  a class with a single symbol value needs no stream at all.

Each class's symbols are coded with one model in one ``constriction`` call, so coding runs in
its compiled loop, never a Python loop per symbol.
"""

from __future__ import annotations

import functools

import constriction
import numpy as np

from ..errors import CorruptBlockError
from .wire import Reader, Writer

N_CLASSES = 24
ZERO_CLASS = 255
_MIN_SCALE = 0.125
#: Laplace tail mass beyond A_c is e**-12 (~6e-6): escapes stay rare.
_TAIL = 12.0


def class_scale(c: int) -> float:
    """Laplace scale (in symbol units) modelled by class ``c``."""
    return _MIN_SCALE * 2.0 ** (c / 2)


@functools.cache
def _half_widths() -> np.ndarray:
    return np.array([int(np.ceil(_TAIL * class_scale(c))) + 2 for c in range(N_CLASSES)], dtype=np.int64)


def half_width(classes: np.ndarray) -> np.ndarray:
    """``A_c`` for each class in ``classes`` (0 for ``ZERO_CLASS``)."""
    table = np.zeros(256, dtype=np.int64)
    table[:N_CLASSES] = _half_widths()
    return table[classes]


def classify(symbols: np.ndarray) -> np.ndarray:
    """Class (uint8) of each row of the int ``symbols`` ``(rows, n)``: from the mean absolute value,
    ``ZERO_CLASS`` for all-zero rows."""
    mean_abs = np.abs(symbols).mean(axis=1)
    c = np.rint(2 * np.log2(np.maximum(mean_abs, 1e-9) / _MIN_SCALE))
    classes = np.clip(c, 0, N_CLASSES - 1).astype(np.uint8)
    classes[~symbols.any(axis=1)] = ZERO_CLASS
    return classes


@functools.cache
def _shared_model(c: int) -> constriction.stream.model.Categorical:
    a = int(_half_widths()[c])
    edges = np.arange(-a, a + 2) - 0.5
    # Discrete Laplace mass of each bin; the two end bins take the tails (they are the escapes).
    cdf = np.where(edges < 0, 0.5 * np.exp(edges / class_scale(c)), 1 - 0.5 * np.exp(-edges / class_scale(c)))
    cdf[0], cdf[-1] = 0.0, 1.0
    return constriction.stream.model.Categorical(np.diff(cdf), perfect=False)


def _counts_model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


class ClassCoder:
    """Codes the rows of a symbol matrix class by class (see module docstring).

    ``tables``: ``"shared"`` or ``"block"``.
    """

    def __init__(self, tables: str) -> None:
        self.tables = tables

    def encode(self, symbols: np.ndarray, classes: np.ndarray, out: Writer) -> None:
        """Write the stream of ``symbols`` ``(rows, n)`` (already clipped to ``±A`` of their row's
        class) to ``out``: block tables if any, then u32 word count and the words."""
        streams: list[tuple[np.ndarray, constriction.stream.model.Categorical]] = []
        for c in self._present(classes):
            a = int(_half_widths()[c])
            sym = (symbols[classes == c] + a).reshape(-1)
            if self.tables == "shared":
                streams.append((sym.astype(np.int32), _shared_model(int(c))))
                continue
            hist = np.bincount(sym, minlength=2 * a + 1)
            lo, hi = np.flatnonzero(hist)[[0, -1]]
            counts = hist[lo : hi + 1]
            # Rescale to u8, keeping every seen symbol encodable (count >= 1).
            q = np.where(counts > 0, np.maximum(1, np.rint(counts * (255 / counts.max()))), 0)
            out.put(np.array([lo - a]), "<i2")
            out.put(np.array([len(q)]), "<u2")
            out.put(q, "u1")
            if len(q) > 1:  # a one-symbol class is fully known from its table
                streams.append(((sym - lo).astype(np.int32), _counts_model(q)))
        coder = constriction.stream.stack.AnsCoder()
        for sym, model in reversed(streams):
            coder.encode_reverse(sym, model)
        words = coder.get_compressed()
        out.put_count(len(words))
        out.put(words, "<u4")

    def decode(self, reader: Reader, classes: np.ndarray, n: int) -> np.ndarray:
        """Read what ``encode`` wrote for rows of ``classes`` with ``n`` symbols each; returns the
        ``(rows, n)`` int64 symbols (escapes still clipped)."""
        symbols = np.zeros((len(classes), n), dtype=np.int64)
        plan: list[tuple[int, int, constriction.stream.model.Categorical]] = []
        for c in self._present(classes):
            a = int(_half_widths()[c])
            if self.tables == "shared":
                plan.append((int(c), -a, _shared_model(int(c))))
                continue
            lo = int(reader.take(1, "<i2")[0])
            size = int(reader.take(1, "<u2")[0])
            counts = reader.take(size, "u1")
            if size == 0 or lo < -a or lo + size - 1 > a or not counts.any():
                raise CorruptBlockError(f"cachegen payload: bad table for class {c}: lo={lo}, {size} entries")
            if size == 1:
                symbols[classes == c] = lo
            else:
                plan.append((int(c), lo, _counts_model(counts)))
        n_words = reader.take_count(1 << 30, "rANS word")
        words = reader.take(n_words, "<u4")
        try:
            coder = constriction.stream.stack.AnsCoder(np.array(words, dtype=np.uint32))
            for c, offset, model in plan:
                rows = classes == c
                symbols[rows] = (
                    coder.decode(model, int(rows.sum()) * n).reshape(-1, n).astype(np.int64) + offset
                )
            exhausted = coder.is_empty()
        except (ValueError, RuntimeError, OverflowError) as exc:
            raise CorruptBlockError(f"cachegen payload: rANS stream does not decode: {exc}") from exc
        if not exhausted:
            raise CorruptBlockError("cachegen payload: rANS stream has data left after the last symbol")
        return symbols

    @staticmethod
    def _present(classes: np.ndarray) -> np.ndarray:
        present = np.unique(classes)
        return present[present != ZERO_CLASS]


def check_classes(classes: np.ndarray) -> None:
    """Raise ``CorruptBlockError`` unless every class is valid."""
    bad = (classes >= N_CLASSES) & (classes != ZERO_CLASS)
    if bad.any():
        raise CorruptBlockError(f"cachegen payload: invalid symbol class {int(classes[bad][0])}")
