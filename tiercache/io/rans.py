"""rANS entropy coding of integer symbols in classes, with our compiled coder (``tiercache.io.ans``).

Symbols are signed integers. Each *row* (e.g. one channel of one head over a block's tokens) gets
a *class* from the mean absolute value of its symbols: class ``c`` models a discrete Laplace
distribution of scale ``b_c = 2**(c/2) / 8`` over ``[-A_c, A_c]``. Symbols outside that range are
*escapes*: coded as ``±A_c`` in the stream, their exact values kept beside it by the caller. Rows
whose symbols are all zero get ``ZERO_CLASS`` and cost nothing in the stream.

Two kinds of tables, both integer frequencies normalised to a power of two (``ans.normalize``):
- shared: the Laplace table of the class, computed from the class index alone (16-bit
  precision); nothing stored.
- block: the class's empirical histogram in this block, stored as ``i16 lo, u16 n, u8 counts[n]``
  and normalised to the smallest power of two >= their sum, at most ``2**12`` (``ans.auto_pb``);
  a class with a single symbol value needs no stream at all.

The stream (u32 word count, then the words) holds the rows class by class (ascending), rows
ascending within a class, in 4 interleaved rANS states; a whole block is coded in one compiled
call, never a Python loop per class or symbol.
"""

from __future__ import annotations

import functools

import numpy as np

from ..errors import ConfigError, CorruptBlockError, ShapeError
from . import ans
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
    classes = np.asarray(classes)
    if classes.size and (classes.min() < 0 or classes.max() > 255):
        raise ShapeError(f"half_width: classes must be uint8 values, got {classes.min()}..{classes.max()}")
    table = np.zeros(256, dtype=np.int64)
    table[:N_CLASSES] = _half_widths()
    return table[classes]


def classify(symbols: np.ndarray) -> np.ndarray:
    """Class (uint8) of each row of the int ``symbols`` ``(rows, n)``: from the mean absolute value,
    ``ZERO_CLASS`` for all-zero rows."""
    if np.ndim(symbols) != 2:
        raise ShapeError(f"classify: symbols must be (rows, n), got shape {np.shape(symbols)}")
    mean_abs = np.abs(symbols).mean(axis=1)
    c = np.rint(2 * np.log2(np.maximum(mean_abs, 1e-9) / _MIN_SCALE))
    classes = np.clip(c, 0, N_CLASSES - 1).astype(np.uint8)
    classes[~symbols.any(axis=1)] = ZERO_CLASS
    return classes


#: Precision of the shared tables: costs at most 0.1% over the model's entropy up to class 17.
_SHARED_PB = 16


@functools.cache
def _shared_tables() -> tuple[np.ndarray, ...]:
    """Stacked tables of the 24 Laplace classes: ``(pb, base, nsym, slot_off, sym_off, slots,
    freq, cum)``."""
    weights = []
    for c in range(N_CLASSES):
        a = int(_half_widths()[c])
        edges = np.arange(-a, a + 2) - 0.5
        # Discrete Laplace mass of each bin; the two end bins take the tails (they are the escapes).
        b = class_scale(c)
        cdf = np.where(edges < 0, 0.5 * np.exp(edges / b), 1 - 0.5 * np.exp(-edges / b))
        cdf[0], cdf[-1] = 0.0, 1.0
        # Integer weights (every bin >= 1): the integer normalisation then builds the same table
        # on every machine unless exp differs by an ulp right at a rounding boundary.
        weights.append(np.maximum(1, np.rint(np.diff(cdf) * 2.0**40)).astype(np.int64))
    sizes = np.array([len(w) for w in weights], dtype=np.int64)
    pb = np.full(N_CLASSES, _SHARED_PB, dtype=np.int64)
    *tables, err = ans.build_tables(np.concatenate(weights), sizes, pb)
    assert err == ans.OK
    base = -_half_widths().astype(np.int64)
    return (pb, base, sizes, *tables)


def _tab_of_class() -> np.ndarray:
    """``tab_of_class`` before any table is assigned: zero rows skipped, other classes invalid."""
    tab = np.full(256, ans.NO_CLASS, dtype=np.int32)
    tab[ZERO_CLASS] = ans.SKIP
    return tab


#: Shared tables: class ``c`` uses table ``c``.
_SHARED_TAB = _tab_of_class()
_SHARED_TAB[:N_CLASSES] = np.arange(N_CLASSES)


class ClassCoder:
    """Codes the rows of a symbol matrix class by class (see module docstring).

    ``tables``: ``"shared"`` or ``"block"``.
    """

    def __init__(self, tables: str) -> None:
        if tables not in ("shared", "block"):
            raise ConfigError(f"rANS class coder: tables must be 'shared' or 'block', got {tables!r}")
        self.tables = tables

    def encode(self, symbols: np.ndarray, classes: np.ndarray, out: Writer) -> None:
        """Write the stream of ``symbols`` ``(rows, n)`` (already clipped to ``±A`` of their row's
        class) to ``out``: block tables if any, then u32 word count and the words."""
        symbols = np.ascontiguousarray(symbols, dtype=np.int64)
        classes = np.ascontiguousarray(classes, dtype=np.uint8)
        if symbols.ndim != 2 or classes.shape != symbols.shape[:1]:
            raise ShapeError(f"rANS encode: symbols {symbols.shape} and classes {classes.shape} must be "
                             "(rows, n) and (rows,)")
        bad = (classes >= N_CLASSES) & (classes != ZERO_CLASS)
        if bad.any():
            raise ShapeError(f"rANS encode: invalid class {int(classes[bad][0])}; classes are "
                             f"0..{N_CLASSES - 1} or ZERO_CLASS, as classify gives them")
        if self.tables == "shared":
            pb, base, nsym, _, sym_off, _, freq, cum = _shared_tables()
            tab_of_class = _SHARED_TAB
        else:
            tables = self._encode_block_tables(symbols, classes, out)
            tab_of_class, pb, base, nsym, sym_off, freq, cum = tables
        words, err = ans.encode_rows(symbols, classes, tab_of_class, pb, base, nsym, sym_off, freq, cum)
        if err != ans.OK:
            raise ShapeError(f"rANS encode: {_OUTSIDE} (error {err})")
        out.put_count(len(words))
        out.put(words, "<u4")

    @staticmethod
    def _encode_block_tables(symbols: np.ndarray, classes: np.ndarray, out: Writer) -> tuple[np.ndarray, ...]:
        tab_of_class = _tab_of_class()
        weights, bases, pbs = [], [], []
        for c in _present(classes):
            tab_of_class[c] = ans.SKIP
            a = int(_half_widths()[c])
            shifted = (symbols[classes == c] + a).reshape(-1)
            if shifted.min() < 0 or shifted.max() > 2 * a:
                raise ShapeError(f"rANS encode: {_OUTSIDE} (class {c})")
            hist = np.bincount(shifted, minlength=2 * a + 1)
            lo, hi = np.flatnonzero(hist)[[0, -1]]
            counts = hist[lo : hi + 1]
            # Rescale to u8, keeping every seen symbol encodable (count >= 1).
            q = np.where(counts > 0, np.maximum(1, np.rint(counts * (255 / counts.max()))), 0)
            q = q.astype(np.int64)
            out.put(np.array([lo - a]), "<i2")
            out.put(np.array([len(q)]), "<u2")
            out.put(q, "u1")
            if len(q) > 1:  # a one-symbol class is fully known from its table
                tab_of_class[c] = len(weights)
                weights.append(q)
                bases.append(lo - a)
                pbs.append(ans.AUTO_PB)
        pb, base, nsym, _, sym_off, _, freq, cum = _block_tables(weights, bases, pbs, "rANS encode")
        return tab_of_class, pb, base, nsym, sym_off, freq, cum

    def decode(self, reader: Reader, classes: np.ndarray, n: int) -> np.ndarray:
        """Read what ``encode`` wrote for rows of ``classes`` with ``n`` symbols each; returns the
        ``(rows, n)`` int64 symbols (escapes still clipped)."""
        if np.ndim(classes) != 1 or n < 0:
            raise ShapeError(f"rANS decode: classes must be (rows,) and n >= 0, got {np.shape(classes)} "
                             f"and {n}")
        classes = np.array(classes, dtype=np.uint8)  # aligned and writable: one compiled variant
        symbols = np.zeros((len(classes), n), dtype=np.int64)
        if self.tables == "shared":
            pb, base, _, slot_off, sym_off, slots, freq, cum = _shared_tables()
            tab_of_class = _SHARED_TAB
        else:
            check_classes(classes)
            tab_of_class = _tab_of_class()
            weights, bases, pbs = [], [], []
            for c in _present(classes):
                tab_of_class[c] = ans.SKIP
                a = int(_half_widths()[c])
                lo = int(reader.take(1, "<i2")[0])
                size = int(reader.take(1, "<u2")[0])
                counts = reader.take(size, "u1")
                if size == 0 or lo < -a or lo + size - 1 > a or not counts.any():
                    raise CorruptBlockError(
                        f"cachegen payload: bad table for class {c}: lo={lo}, {size} entries"
                    )
                if size == 1:
                    symbols[classes == c] = lo
                else:
                    tab_of_class[c] = len(weights)
                    weights.append(counts.astype(np.int64))
                    bases.append(lo)
                    pbs.append(ans.AUTO_PB)
            tables = _block_tables(weights, bases, pbs, "cachegen payload")
            pb, base, _, slot_off, sym_off, slots, freq, cum = tables
        n_words = reader.take_count(1 << 30, "rANS word")
        words = reader.take(n_words, "<u4").astype(np.uint32)  # an aligned, writable copy
        err = ans.decode_rows(
            words, classes, tab_of_class, pb, base, slot_off, sym_off, slots, freq, cum, symbols
        )
        if err == ans.ERR_CLASS:
            check_classes(classes)
        if err != ans.OK:
            raise CorruptBlockError(f"cachegen payload: rANS stream does not decode: {_ERRORS.get(err, err)}")
        return symbols


_OUTSIDE = ("a symbol lies outside its class's table: clip each row to ±half_width(its class), as "
            "cachegen does")

_ERRORS = {
    ans.ERR_TRUNCATED: "it ends before the last symbol",
    ans.ERR_STATE: "a coder state is out of range or does not end where it started",
    ans.ERR_TRAILING: "data left after the last symbol",
}


def _present(classes: np.ndarray) -> np.ndarray:
    present = np.unique(classes)
    return present[present != ZERO_CLASS]


def _block_tables(
    weights: list[np.ndarray], bases: list[int], pbs: list[int], what: str
) -> tuple[np.ndarray, ...]:
    """Stacked tables of a block: ``(pb, base, nsym, slot_off, sym_off, slots, freq, cum)``."""
    sizes = np.array([len(w) for w in weights], dtype=np.int64)
    pb = np.array(pbs, dtype=np.int64)
    flat = np.concatenate(weights) if weights else np.zeros(0, dtype=np.int64)
    *tables, err = ans.build_tables(flat, sizes, pb)
    if err != ans.OK:
        raise CorruptBlockError(f"{what}: a block table does not normalise (error {err})")
    return (pb, np.array(bases, dtype=np.int64), sizes, *tables)


def check_classes(classes: np.ndarray) -> None:
    """Raise ``CorruptBlockError`` unless every class is valid."""
    bad = (classes >= N_CLASSES) & (classes != ZERO_CLASS)
    if bad.any():
        raise CorruptBlockError(f"cachegen payload: invalid symbol class {int(classes[bad][0])}")
