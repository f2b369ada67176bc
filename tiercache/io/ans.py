"""Compiled core of the class coder (``tiercache.io.rans``): an interleaved rANS coder in numba.

- 64-bit states kept in ``[L, L << 32)`` with ``L = 2**31``, renormalised by 32-bit words.
- Interleaved states: symbol ``g`` of a block's stream uses state ``g % lanes``, so the CPU
  overlaps their dependency chains; ``lanes`` is 4, or 2 for streams of fewer than
  ``WIDE_STREAM`` symbols (each state's flush costs about 4 bytes more than the information it
  carries, 1% of a 16-token block of SmolLM2 with 4 lanes). The encoder starts every state at
  ``L`` and flushes each as two words; the decoder checks that every state ends at ``L`` and
  every word was read.
- Integer frequency tables normalised to ``2**pb`` (``pb <= 16``); decoding a symbol is one
  slot -> symbol lookup (no search), one multiply and at most one word read.
- A whole block (all of its classes) is coded in one compiled call: the caller passes every
  table stacked (``slot_off``/``sym_off`` index them) and ``tab_of_class`` maps each row class to
  its table, or to -1 for rows that are not in the stream.

Every read of the word stream is bounds-checked inside the loop; errors come back as codes
(``ERR_*``), never as out-of-bounds reads or hangs (every loop is bounded by the symbol count).
``@njit(cache=True, nogil=True)``: compiled once to numba's on-disk cache, and the disk tier's
I/O threads decode in parallel.
"""

from __future__ import annotations

import numpy as np
from numba import njit

LANES = 4
#: Streams shorter than this (in symbols) use 2 lanes.
WIDE_STREAM = 8192
PB_MAX = 16
_L = 1 << 31
_WORD = 0xFFFFFFFF

OK = 0
ERR_TRUNCATED = 1  # the stream ends before the last symbol
ERR_STATE = 2  # a state is out of range, or does not end where the encoder started
ERR_TRAILING = 3  # words left after the last symbol
ERR_SYMBOL = 4  # encoder: a symbol outside its table or of frequency 0
ERR_TABLE = 5  # table construction: more nonzero weights than slots
ERR_CLASS = 6  # a row's class maps to NO_CLASS
#: ``tab_of_class`` values: rows outside the stream, and invalid classes.
SKIP = -1
NO_CLASS = -2


@njit(cache=True, nogil=True)
def normalize(weights: np.ndarray, pb: int, freq: np.ndarray) -> int:
    """Fill ``freq`` (same length as the int64 ``weights`` >= 0) with integer frequencies that sum
    to ``2**pb``, about proportional to ``weights``, >= 1 wherever a weight is > 0 and 0 elsewhere.
    Integer arithmetic only, so every machine builds the same table. Returns an ``ERR_*`` code."""
    m = np.int64(1) << pb
    n = weights.size
    total = np.int64(0)
    nnz = 0
    for i in range(n):
        if weights[i] < 0:
            return ERR_TABLE
        total += weights[i]
        if weights[i] > 0:
            nnz += 1
    if nnz == 0 or nnz > m:
        return ERR_TABLE
    s = np.int64(0)
    rem = np.zeros(n, np.int64)
    for i in range(n):
        w = weights[i]
        if w == 0:
            freq[i] = 0
            continue
        # w * m < 2**63 as long as total < 2**(63 - pb); callers keep weights below 2**40.
        f = (w * m) // total
        rem[i] = (w * m) % total
        if f == 0:
            f = 1
            rem[i] = -1  # already rounded up
        freq[i] = f
        s += f
    if s < m:
        # Rounded down: the deficit (< the number of symbols) goes one each to the symbols whose
        # remainder is at least half (those nearest rounding would raise), in index order, then
        # to any seen symbol. No sort: this runs per class per block.
        d = m - s
        half = (total + 1) // 2
        while d > 0:
            for i in range(n):
                if d > 0 and weights[i] > 0 and rem[i] >= half:
                    freq[i] += 1
                    rem[i] = -1
                    d -= 1
            half = 0
    elif s > m:
        # Too many weights were raised to 1: take the excess from the others, in proportion to
        # what they can give (f - 1), then one each from the largest (f above half the largest
        # first), in index order.
        excess = s - m
        avail = np.int64(0)
        top = np.int64(0)
        for i in range(n):
            if freq[i] > 1:
                avail += freq[i] - 1
        if avail < excess:
            return ERR_TABLE
        taken = np.int64(0)
        for i in range(n):
            if freq[i] > 1:
                t = (excess * (freq[i] - 1)) // avail
                freq[i] -= t
                taken += t
            top = max(top, freq[i])
        excess -= taken
        floor = max(np.int64(1), top // 2)
        while excess > 0:
            for i in range(n):
                if excess > 0 and freq[i] > floor:
                    freq[i] -= 1
                    excess -= 1
            floor = np.int64(1)
    return OK


#: Precision of tables built from stored counts (per block), unless they have more nonzero
#: counts: their slot tables are built per block, so they are kept small.
BLOCK_PB = 12
AUTO_PB = -1


@njit(cache=True, nogil=True)
def _bit_length(v: int) -> int:
    b = 0
    while v > 0:
        v >>= 1
        b += 1
    return b


@njit(cache=True, nogil=True)
def auto_pb(weights: np.ndarray) -> int:
    """Precision for counts: the smallest power of two >= their sum, at most ``BLOCK_PB`` bits
    unless twice the number of nonzero counts needs more (at most ``PB_MAX``)."""
    nnz = 0
    total = 0
    for w in weights:
        total += w
        if w > 0:
            nnz += 1
    return min(PB_MAX, max(_bit_length(nnz) + 1, min(BLOCK_PB, _bit_length(total - 1))))


@njit(cache=True, nogil=True)
def build_tables(weights, sizes, pb):
    """Stacked tables of ``sizes.size`` models: model ``t`` has weights
    ``weights[sym_off[t] : sym_off[t] + sizes[t]]`` normalised to ``2**pb[t]``; a ``pb[t]`` of
    ``AUTO_PB`` is replaced (in place) by ``auto_pb`` of those weights. Returns
    ``(slot_off, sym_off, slots, freq, cum, ERR_* code)``; ``slots[slot_off[t] + k]`` is the
    symbol index of slot ``k``."""
    nt = sizes.size
    slot_off = np.zeros(nt, np.int64)
    sym_off = np.zeros(nt, np.int64)
    ns = 0
    nslot = 0
    for t in range(nt):
        if pb[t] == AUTO_PB:
            pb[t] = auto_pb(weights[ns : ns + sizes[t]])
        if pb[t] < 0 or pb[t] > PB_MAX:
            empty = np.zeros(0, np.int32)
            return slot_off, sym_off, np.zeros(0, np.uint16), empty, empty, ERR_TABLE
        sym_off[t] = ns
        slot_off[t] = nslot
        ns += sizes[t]
        nslot += np.int64(1) << pb[t]
    slots = np.empty(nslot, np.uint16)
    freq = np.zeros(ns, np.int32)
    cum = np.zeros(ns, np.int32)
    f = np.zeros(ns, np.int64)
    for t in range(nt):
        a, e = sym_off[t], sym_off[t] + sizes[t]
        err = normalize(weights[a:e], pb[t], f[a:e])
        if err != OK:
            return slot_off, sym_off, slots, freq, cum, err
        at = slot_off[t]
        c = 0
        for i in range(a, e):
            freq[i] = f[i]
            cum[i] = c
            c += f[i]
            for _ in range(f[i]):
                slots[at] = i - a
                at += 1
    return slot_off, sym_off, slots, freq, cum, OK


@njit(cache=True, nogil=True)
def _stream_rows(row_class: np.ndarray, tab_of_class: np.ndarray) -> np.ndarray:
    """Rows in stream order: class by class (ascending), rows ascending within a class; ``None``
    if a row's class is ``NO_CLASS``."""
    count = 0
    for r in range(row_class.size):
        t = tab_of_class[row_class[r]]
        if t >= 0:
            count += 1
        elif t == NO_CLASS:
            return None
    order = np.empty(count, np.int64)
    k = 0
    for c in range(256):
        if tab_of_class[c] < 0:
            continue
        for r in range(row_class.size):
            if row_class[r] == c:
                order[k] = r
                k += 1
    return order


@njit(cache=True, nogil=True)
def lanes_for(total: int) -> int:
    """Number of interleaved states of a stream of ``total`` symbols."""
    return LANES if total >= WIDE_STREAM else 2


@njit(cache=True, nogil=True)
def encode_rows(symbols, row_class, tab_of_class, pb, base, nsym, sym_off, freq, cum):
    """Encode the rows of ``symbols`` ``(rows, n)`` int64 whose class has a table. Returns
    ``(words uint32, ERR_* code)``."""
    order = _stream_rows(row_class, tab_of_class)
    if order is None:
        return np.zeros(0, np.uint32), ERR_CLASS
    n = symbols.shape[1]
    total = order.size * n
    if total == 0:
        return np.zeros(0, np.uint32), OK
    lanes = lanes_for(total)
    buf = np.empty(total + 2 * lanes, np.uint32)
    nout = 0
    xs = np.full(lanes, _L, np.int64)
    last = lanes - 1
    for k in range(order.size - 1, -1, -1):
        r = order[k]
        t = tab_of_class[row_class[r]]
        p = pb[t]
        fo = sym_off[t]
        b = base[t]
        m = nsym[t]
        bound = _L >> p
        for j in range(n - 1, -1, -1):
            s = symbols[r, j] - b
            if s < 0 or s >= m:
                return np.zeros(0, np.uint32), ERR_SYMBOL
            f = np.int64(freq[fo + s])
            if f == 0:
                return np.zeros(0, np.uint32), ERR_SYMBOL
            lane = (k * n + j) & last
            x = xs[lane]
            if (x >> 32) >= bound * f:
                buf[nout] = x & _WORD
                nout += 1
                x >>= 32
            q = x // f
            xs[lane] = (q << p) + (x - q * f) + cum[fo + s]
    for lane in range(lanes - 1, -1, -1):
        buf[nout] = xs[lane] & _WORD
        buf[nout + 1] = xs[lane] >> 32
        nout += 2
    return buf[:nout][::-1].copy(), OK


@njit(cache=True, nogil=True)
def _step(x, pos, words, slots, so, p, fr, cu, fo):
    """Decode one symbol from state ``x``: ``(state, symbol index, pos)``, ``pos = -1`` when the
    stream is exhausted."""
    slot = x & ((np.int64(1) << p) - 1)
    s = np.int64(slots[so + slot])
    x = np.int64(fr[fo + s]) * (x >> p) + slot - cu[fo + s]
    if x < _L:
        if pos >= words.size:
            return x, s, np.int64(-1)
        x = (x << 32) | np.int64(words[pos])
        pos += 1
    return x, s, pos


@njit(cache=True, nogil=True)
def decode_rows(words, row_class, tab_of_class, pb, base, slot_off, sym_off, slots, freq, cum, out):
    """Decode into the rows of ``out`` ``(rows, n)`` int64 whose class has a table (other rows are
    left alone). Returns an ``ERR_*`` code."""
    order = _stream_rows(row_class, tab_of_class)
    if order is None:
        return ERR_CLASS
    n = out.shape[1]
    total = order.size * n
    nw = words.size
    if total == 0:
        return OK if nw == 0 else ERR_TRAILING
    lanes = lanes_for(total)
    last = lanes - 1
    if nw < 2 * lanes:
        return ERR_TRUNCATED
    init = np.full(LANES, _L, np.int64)  # unused lanes stay at L
    for lane in range(lanes):
        if words[2 * lane] >= (1 << 31):  # states stay below L << 32 = 2**63
            return ERR_STATE
        x = (np.int64(words[2 * lane]) << 32) | np.int64(words[2 * lane + 1])
        if x < _L:
            return ERR_STATE
        init[lane] = x
    x0, x1, x2, x3 = init[0], init[1], init[2], init[3]
    pos = np.int64(2 * lanes)
    g = 0
    for k in range(order.size):
        r = order[k]
        t = tab_of_class[row_class[r]]
        p = pb[t]
        so = slot_off[t]
        fo = sym_off[t]
        b = base[t]
        j = 0
        # One symbol at a time until the global index is a multiple of lanes, then lanes at a
        # time, then the row's tail one at a time.
        while j < n and (g & last) != 0:
            lane = g & last
            if lane == 1:
                x1, s, pos = _step(x1, pos, words, slots, so, p, freq, cum, fo)
            elif lane == 2:
                x2, s, pos = _step(x2, pos, words, slots, so, p, freq, cum, fo)
            else:
                x3, s, pos = _step(x3, pos, words, slots, so, p, freq, cum, fo)
            if pos < 0:
                return ERR_TRUNCATED
            out[r, j] = s + b
            j += 1
            g += 1
        mask = (np.int64(1) << p) - 1
        # The lanes written out, one symbol each (as _step); their chains overlap.
        if lanes == 4:
            while j + 4 <= n:
                sl = x0 & mask
                s0 = np.int64(slots[so + sl])
                x0 = np.int64(freq[fo + s0]) * (x0 >> p) + sl - cum[fo + s0]
                if x0 < _L:
                    if pos >= nw:
                        return ERR_TRUNCATED
                    x0 = (x0 << 32) | np.int64(words[pos])
                    pos += 1
                sl = x1 & mask
                s1 = np.int64(slots[so + sl])
                x1 = np.int64(freq[fo + s1]) * (x1 >> p) + sl - cum[fo + s1]
                if x1 < _L:
                    if pos >= nw:
                        return ERR_TRUNCATED
                    x1 = (x1 << 32) | np.int64(words[pos])
                    pos += 1
                sl = x2 & mask
                s2 = np.int64(slots[so + sl])
                x2 = np.int64(freq[fo + s2]) * (x2 >> p) + sl - cum[fo + s2]
                if x2 < _L:
                    if pos >= nw:
                        return ERR_TRUNCATED
                    x2 = (x2 << 32) | np.int64(words[pos])
                    pos += 1
                sl = x3 & mask
                s3 = np.int64(slots[so + sl])
                x3 = np.int64(freq[fo + s3]) * (x3 >> p) + sl - cum[fo + s3]
                if x3 < _L:
                    if pos >= nw:
                        return ERR_TRUNCATED
                    x3 = (x3 << 32) | np.int64(words[pos])
                    pos += 1
                out[r, j] = s0 + b
                out[r, j + 1] = s1 + b
                out[r, j + 2] = s2 + b
                out[r, j + 3] = s3 + b
                j += 4
                g += 4
        else:
            while j + 2 <= n:
                sl = x0 & mask
                s0 = np.int64(slots[so + sl])
                x0 = np.int64(freq[fo + s0]) * (x0 >> p) + sl - cum[fo + s0]
                if x0 < _L:
                    if pos >= nw:
                        return ERR_TRUNCATED
                    x0 = (x0 << 32) | np.int64(words[pos])
                    pos += 1
                sl = x1 & mask
                s1 = np.int64(slots[so + sl])
                x1 = np.int64(freq[fo + s1]) * (x1 >> p) + sl - cum[fo + s1]
                if x1 < _L:
                    if pos >= nw:
                        return ERR_TRUNCATED
                    x1 = (x1 << 32) | np.int64(words[pos])
                    pos += 1
                out[r, j] = s0 + b
                out[r, j + 1] = s1 + b
                j += 2
                g += 2
        while j < n:
            lane = g & last
            if lane == 0:
                x0, s, pos = _step(x0, pos, words, slots, so, p, freq, cum, fo)
            elif lane == 1:
                x1, s, pos = _step(x1, pos, words, slots, so, p, freq, cum, fo)
            elif lane == 2:
                x2, s, pos = _step(x2, pos, words, slots, so, p, freq, cum, fo)
            else:
                x3, s, pos = _step(x3, pos, words, slots, so, p, freq, cum, fo)
            if pos < 0:
                return ERR_TRUNCATED
            out[r, j] = s + b
            j += 1
            g += 1
    if pos != nw:
        return ERR_TRAILING
    if x0 != _L or x1 != _L or x2 != _L or x3 != _L:
        return ERR_STATE
    return OK
