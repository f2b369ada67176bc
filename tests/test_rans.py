"""The class coder (``tiercache.io.rans``) and its compiled rANS core (``tiercache.io.ans``):
round trips, size against the entropy, and corrupt streams."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache.blocks import BlockLayout
from tiercache.errors import ConfigError, CorruptBlockError, FingerprintError, ShapeError
from tiercache.io import ans
from tiercache.io.codec import make_codec
from tiercache.io.rans import N_CLASSES, ZERO_CLASS, ClassCoder, class_scale, classify, half_width
from tiercache.io.record import decode_record, encode_record
from tiercache.io.wire import Reader, Writer

TABLES = ("shared", "block")


def _laplace(rng: np.random.Generator, scales: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of rounded Laplace symbols of the given scales, classified and clipped as cachegen does."""
    x = np.rint(rng.laplace(0.0, scales[:, None], size=(len(scales), n))).astype(np.int64)
    classes = classify(x)
    limit = half_width(classes)[:, None]
    return np.clip(x, -limit, limit), classes


def _encode(tables: str, symbols: np.ndarray, classes: np.ndarray) -> bytes:
    out = Writer()
    ClassCoder(tables).encode(symbols, classes, out)
    return out.bytes()


def _decode(tables: str, data: bytes, classes: np.ndarray, n: int) -> np.ndarray:
    reader = Reader(data, "test")
    symbols = ClassCoder(tables).decode(reader, classes, n)
    reader.finish()
    return symbols


def _round_trip(tables: str, symbols: np.ndarray, classes: np.ndarray) -> bytes:
    data = _encode(tables, symbols, classes)
    np.testing.assert_array_equal(_decode(tables, data, classes, symbols.shape[1]), symbols)
    return data


# -- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tables", TABLES)
@pytest.mark.parametrize("c", range(N_CLASSES))
def test_round_trip_every_class(tables, c):
    """Every class, with its own Laplace data and every symbol of its range (the escapes at ±A)."""
    rng = np.random.default_rng(c)
    a = int(half_width(np.array([c]))[0])
    x = np.rint(rng.laplace(0.0, class_scale(c), size=(6, 40))).astype(np.int64)
    x[0, :2] = [-a, a]
    symbols = np.clip(x, -a, a)
    classes = np.full(6, c, dtype=np.uint8)
    _round_trip(tables, symbols, classes)
    full = np.arange(-a, a + 1, dtype=np.int64)[None, :]  # each symbol of the table once
    _round_trip(tables, full, np.array([c], dtype=np.uint8))


@pytest.mark.parametrize("tables", TABLES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 17, 64, 86, 129])
def test_round_trip_mixed_classes_and_lengths(tables, n):
    """Rows of many classes (and zero rows), with row lengths that do and do not fill the lanes,
    in streams of 2 lanes and (from ``WIDE_STREAM`` symbols) 4."""
    rng = np.random.default_rng(n)
    scales = np.exp(rng.uniform(np.log(0.05), np.log(400), size=96))
    symbols, classes = _laplace(rng, scales, n)
    symbols[::7] = 0
    classes = classify(symbols)
    assert (classes == ZERO_CLASS).any() and len(np.unique(classes)) > 5
    _round_trip(tables, symbols, classes)


@pytest.mark.parametrize("tables", TABLES)
def test_round_trip_uniform_random_symbols(tables):
    """Symbols uniform over each class's range: far from the Laplace model, still exact."""
    rng = np.random.default_rng(1)
    classes = rng.integers(0, N_CLASSES, size=48).astype(np.uint8)
    a = half_width(classes)[:, None]
    symbols = rng.integers(-a, a + 1, size=(48, 33))
    _round_trip(tables, symbols, classes)


@pytest.mark.parametrize("tables", TABLES)
def test_single_symbol_classes(tables):
    """Rows of one constant value: a block table of one entry and no stream at all."""
    symbols = np.full((4, 16), 3, dtype=np.int64)
    classes = classify(symbols)
    data = _round_trip(tables, symbols, classes)
    if tables == "block":
        assert struct.unpack_from("<I", data, len(data) - 4)[0] == 0  # zero words


@pytest.mark.parametrize("tables", TABLES)
def test_zero_rows_cost_only_the_word_count(tables):
    symbols = np.zeros((192, 16), dtype=np.int64)
    classes = classify(symbols)
    assert (classes == ZERO_CLASS).all()
    assert _round_trip(tables, symbols, classes) == struct.pack("<I", 0)


@pytest.mark.parametrize("tables", TABLES)
@pytest.mark.parametrize("shape", [(0, 16), (5, 0), (0, 0)])
def test_empty_input(tables, shape):
    symbols = np.zeros(shape, dtype=np.int64)
    classes = np.full(shape[0], ZERO_CLASS if shape[1] == 0 else 3, dtype=np.uint8)
    assert _round_trip(tables, symbols, classes) == struct.pack("<I", 0)


@pytest.mark.parametrize("tables", TABLES)
def test_large_block(tables):
    rng = np.random.default_rng(7)
    symbols, classes = _laplace(rng, np.exp(rng.uniform(-2, 5, size=192)), 1024)
    _round_trip(tables, symbols, classes)


def test_symbol_outside_its_class_is_an_encoder_error():
    symbols = np.array([[0, 1, 99]], dtype=np.int64)
    with pytest.raises(ValueError):
        _encode("shared", symbols, np.array([0], dtype=np.uint8))


@pytest.mark.parametrize("tables", TABLES)
@pytest.mark.parametrize("symbols, classes, message", [
    (np.zeros(5, dtype=np.int64), np.zeros(5, dtype=np.uint8), r"\(rows, n\)"),
    (np.zeros((2, 4), dtype=np.int64), np.zeros(3, dtype=np.uint8), r"\(rows, n\)"),
    (np.zeros((1, 4), dtype=np.int64), np.array([30], dtype=np.uint8), "invalid class 30"),
    (np.array([[-50, 0, 0, 0]]), np.array([0], dtype=np.uint8), "clip each row"),
], ids=["one-dim", "rows-differ", "bad-class", "unclipped"])
def test_bad_encoder_arguments_raise_shape_error(tables, symbols, classes, message):
    with pytest.raises(ShapeError, match=message):
        _encode(tables, symbols, classes)


def test_bad_arguments_of_the_helpers_raise_tiercache_errors():
    with pytest.raises(ShapeError, match=r"\(rows, n\)"):
        classify(np.zeros(5))
    with pytest.raises(ShapeError, match="uint8"):
        half_width(np.array([300]))
    with pytest.raises(ConfigError, match="'shared' or 'block'"):
        ClassCoder("blocks")
    with pytest.raises(ShapeError, match="n >= 0"):
        ClassCoder("shared").decode(Reader(b"", "test"), np.zeros(2, dtype=np.uint8), -1)


# -- size -----------------------------------------------------------------------------------------


def _model_bits(symbols: np.ndarray, classes: np.ndarray) -> float:
    """Ideal size in bits of ``symbols`` under the classes' Laplace models (what an exact
    arithmetic coder of the same model would write)."""
    bits = 0.0
    for c in np.unique(classes[classes != ZERO_CLASS]):
        a, b = int(half_width(np.array([c]))[0]), class_scale(int(c))
        edges = np.arange(-a, a + 2) - 0.5
        cdf = np.where(edges < 0, 0.5 * np.exp(edges / b), 1 - 0.5 * np.exp(-edges / b))
        cdf[0], cdf[-1] = 0.0, 1.0
        p = np.diff(cdf)
        bits += float(-np.log2(p[symbols[classes == c] + a]).sum())
    return bits


def _entropy_bits(symbols: np.ndarray, classes: np.ndarray) -> float:
    """Empirical entropy of each class's symbols (no table cost)."""
    bits = 0.0
    for c in np.unique(classes[classes != ZERO_CLASS]):
        _, counts = np.unique(symbols[classes == c], return_counts=True)
        bits += float(-(counts * np.log2(counts / counts.sum())).sum())
    return bits


def test_shared_size_is_within_half_a_percent_of_the_model():
    """16-bit tables and 4 flushed states cost < 0.5% over an exact coder of the same model."""
    rng = np.random.default_rng(3)
    symbols, classes = _laplace(rng, np.exp(rng.uniform(-2, 5, size=192)), 256)
    data = _encode("shared", symbols, classes)
    assert 8 * len(data) <= 1.005 * _model_bits(symbols, classes) + 8 * 4 * (2 * ans.LANES + 1)


def test_block_size_is_close_to_the_entropy():
    """Block tables (u8 counts) get within 2% of the empirical entropy, tables not counted."""
    rng = np.random.default_rng(4)
    symbols, classes = _laplace(rng, np.full(64, 6.0), 1024)
    data = _encode("block", symbols, classes)
    table_bytes = sum(4 + int(np.ptp(symbols[classes == c])) + 1 for c in np.unique(classes))
    stream_bits = 8 * (len(data) - table_bytes - 4)
    assert stream_bits <= 1.02 * _entropy_bits(symbols, classes) + 8 * 4 * 2 * ans.LANES


# -- corrupt streams ------------------------------------------------------------------------------


def _shared_case(seed: int = 0, n: int = 16) -> tuple[np.ndarray, np.ndarray, bytes]:
    rng = np.random.default_rng(seed)
    symbols, classes = _laplace(rng, np.exp(rng.uniform(-1, 4, size=48)), n)
    return symbols, classes, _encode("shared", symbols, classes)


def _with_words(words: np.ndarray) -> bytes:
    return struct.pack("<I", len(words)) + np.asarray(words, dtype="<u4").tobytes()


@pytest.mark.parametrize("drop", [1, 2, 8, 9, 1000])
def test_truncated_words_raise(drop):
    symbols, classes, data = _shared_case()
    words = np.frombuffer(data[4:], dtype="<u4")
    with pytest.raises(CorruptBlockError):
        _decode("shared", _with_words(words[: max(0, len(words) - drop)]), classes, 16)


def test_extra_words_raise():
    symbols, classes, data = _shared_case()
    words = np.frombuffer(data[4:], dtype="<u4")
    with pytest.raises(CorruptBlockError):
        _decode("shared", _with_words(np.append(words, 12345)), classes, 16)


@pytest.mark.parametrize("n", [4, 256])
def test_flipped_bits_raise_or_decode_in_bounds(n):
    """Every word of a short stream (2 lanes), 300 of a long one (4 lanes). A flip in the last
    words read can decode to other symbols that end in valid states: the stream check (all words
    read, every state back at its start) catches almost every flip, not all of them; the record's
    crc32 is what catches every one."""
    symbols, classes, data = _shared_case(n=n)
    words = np.frombuffer(data[4:], dtype="<u4").copy()
    assert (len(classes) * n >= ans.WIDE_STREAM) == (n == 256)
    at = np.random.default_rng(n).permutation(len(words))[:300]
    tried = raised = 0
    for i in sorted(set(at) | {0, 1, 2, 3, 4, 5, 6, 7, len(words) - 1}):
        for bit in (0, 7, 15, 16, 31):
            bad = words.copy()
            bad[i] ^= np.uint32(1 << bit)
            tried += 1
            try:
                out = _decode("shared", _with_words(bad), classes, n)
            except CorruptBlockError:
                raised += 1
            else:
                assert out.shape == symbols.shape and not np.array_equal(out, symbols)
                limit = half_width(classes)[:, None]
                assert (np.abs(out) <= np.maximum(limit, 0)).all()
    assert raised >= 0.95 * tried


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_words=st.integers(0, 300), tables=st.sampled_from(TABLES))
def test_random_word_streams_raise(seed, n_words, tables):
    """Random words (and, for block tables, random table bytes) raise; never crash or hang."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, N_CLASSES, size=12).astype(np.uint8)
    prefix = b""
    if tables == "block":
        for c in np.unique(classes):  # valid tables of random counts
            a = int(half_width(np.array([c]))[0])
            size = int(rng.integers(2, 2 * a + 2))
            lo = int(rng.integers(-a, a - size + 2))
            counts = rng.integers(0, 256, size=size).astype(np.uint8)
            counts[0] = max(counts[0], 1)
            prefix += struct.pack("<hH", lo, size) + counts.tobytes()
    words = rng.integers(0, 2**32, size=n_words, dtype=np.uint64).astype(np.uint32)
    with pytest.raises(CorruptBlockError):
        _decode(tables, prefix + _with_words(words), classes, 16)


@pytest.mark.parametrize("tables", TABLES)
def test_wrong_row_length_or_classes_raise(tables):
    rng = np.random.default_rng(5)
    symbols, classes = _laplace(rng, np.exp(rng.uniform(-1, 4, size=48)), 16)
    data = _encode(tables, symbols, classes)
    for n in (15, 17):
        with pytest.raises(CorruptBlockError):
            _decode(tables, data, classes, n)
    other = classes.copy()
    other[np.flatnonzero(classes != ZERO_CLASS)[0]] ^= 1
    with pytest.raises(CorruptBlockError):
        _decode(tables, data, other, 16)


@pytest.mark.parametrize("tables", TABLES)
def test_invalid_class_raises(tables):
    classes = np.array([3, 200], dtype=np.uint8)
    with pytest.raises(CorruptBlockError, match="class"):
        _decode(tables, struct.pack("<I", 0), classes, 16)


@pytest.mark.parametrize(
    "table",
    [struct.pack("<hH", 0, 0), struct.pack("<hH", -99, 3) + bytes(3), struct.pack("<hH", 0, 2) + bytes(2)],
)
def test_bad_block_tables_raise(table):
    with pytest.raises(CorruptBlockError):
        _decode("block", table + struct.pack("<I", 0), np.array([5], dtype=np.uint8), 16)


def test_old_format_records_are_rejected():
    """Records of format version 1 (constriction's streams) are refused, not misdecoded: like
    every format before model fingerprints, with a ``FingerprintError`` saying so; a version this
    tiercache does not know is a ``CorruptBlockError``."""
    codec = make_codec("cachegen")
    layout = BlockLayout(3, 16, 64, torch.float16)
    k, v = (torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(s)).half() for s in (0, 1))

    def as_version(version: int) -> bytes:
        body = bytearray(encode_record(codec, k, v, layout)[:-4])
        struct.pack_into("<H", body, 4, version)
        return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))

    with pytest.raises(FingerprintError, match="record format 1 was written by a tiercache without model"):
        decode_record(as_version(1))
    with pytest.raises(CorruptBlockError, match="format version 99"):
        decode_record(as_version(99))


# -- tables ---------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    weights=st.lists(st.integers(0, 2**40), min_size=1, max_size=300).filter(any),
    pb=st.integers(9, ans.PB_MAX),
)
def test_normalize_sums_to_the_power_of_two_and_keeps_every_seen_symbol(weights, pb):
    w = np.array(weights, dtype=np.int64)
    freq = np.zeros(len(w), dtype=np.int64)
    assert ans.normalize(w, pb, freq) == ans.OK
    assert freq.sum() == 1 << pb
    assert ((freq >= 1) == (w > 0)).all()


def test_normalize_refuses_more_symbols_than_slots():
    freq = np.zeros(300, dtype=np.int64)
    assert ans.normalize(np.ones(300, dtype=np.int64), 8, freq) == ans.ERR_TABLE


def test_threads_decode_concurrently():
    """The compiled coder releases the GIL (``nogil``): the disk tier's I/O threads decode side
    by side, each getting its own right answer."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [_shared_case(seed, n=64) for seed in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda case: _decode("shared", case[2], case[1], 64), cases * 4))
    for (symbols, _, _), got in zip(cases * 4, results):
        np.testing.assert_array_equal(got, symbols)
