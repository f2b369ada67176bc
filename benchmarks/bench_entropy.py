"""Entropy coder of the cachegen codec: decode ns/symbol, size, and whole-codec decode MB/s.

The symbols are what ``CacheGenCodec`` hands its class coder for random-normal KV of SmolLM2's
block shape (3 kv heads x head_dim 64; 16- and 64-token blocks), plain and with a few outlier
key channels (10x, as real keys have), at three step settings. For each: the coded size and the
decode time of our coder (``tiercache.io.ans``) and, when ``constriction`` is installed, of the
constriction coder it replaced (the reference implementation below, same tables and escapes);
the empirical entropy of the symbols (per class and block, no table cost: a lower bound; the
block-table sizes include their stored u8 tables);
and the full ``CacheGenCodec.decode`` of one block. Times are CPU time (``time.process_time``)
of one thread, best of 5 repeats; MB/s are of reconstructed fp16 (2 bytes per symbol).

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/bench_entropy.py
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_results  # noqa: E402

from tiercache.blocks import BlockLayout  # noqa: E402
from tiercache.io import rans  # noqa: E402
from tiercache.io.cachegen import CacheGenCodec  # noqa: E402
from tiercache.io.wire import Reader, Writer  # noqa: E402

try:
    import constriction
except ImportError:  # the reference is optional: tiercache no longer depends on it
    constriction = None


class ConstrictionReference:
    """The class coder as it was with constriction (shared Laplace tables or u8 block tables)."""

    def __init__(self, tables: str) -> None:
        self.tables = tables
        self._shared: dict[int, object] = {}

    def _model(self, c: int):
        if c not in self._shared:
            a = int(rans.half_width(np.array([c]))[0])
            s = rans.class_scale(c)
            edges = np.arange(-a, a + 2) - 0.5
            cdf = np.where(edges < 0, 0.5 * np.exp(edges / s), 1 - 0.5 * np.exp(-edges / s))
            cdf[0], cdf[-1] = 0.0, 1.0
            self._shared[c] = constriction.stream.model.Categorical(np.diff(cdf), perfect=False)
        return self._shared[c]

    def encode(self, symbols: np.ndarray, classes: np.ndarray) -> tuple[bytes, list]:
        streams, plan = [], []
        for c in rans._present(classes):
            a = int(rans.half_width(np.array([c]))[0])
            sym = (symbols[classes == c] + a).reshape(-1)
            if self.tables == "shared":
                streams.append((sym.astype(np.int32), self._model(int(c))))
                plan.append((int(c), -a, self._model(int(c))))
                continue
            hist = np.bincount(sym, minlength=2 * a + 1)
            lo, hi = np.flatnonzero(hist)[[0, -1]]
            counts = hist[lo : hi + 1]
            q = np.where(counts > 0, np.maximum(1, np.rint(counts * (255 / counts.max()))), 0)
            if len(q) > 1:
                model = constriction.stream.model.Categorical(q.astype(np.float64), perfect=False)
                streams.append(((sym - lo).astype(np.int32), model))
                plan.append((int(c), int(lo - a), model))
        coder = constriction.stream.stack.AnsCoder()
        for sym, model in reversed(streams):
            coder.encode_reverse(sym, model)
        return coder.get_compressed(), plan

    @staticmethod
    def decode(words: np.ndarray, plan: list, classes: np.ndarray, n: int) -> np.ndarray:
        symbols = np.zeros((len(classes), n), dtype=np.int64)
        coder = constriction.stream.stack.AnsCoder(words)
        for c, offset, model in plan:
            rows = classes == c
            symbols[rows] = coder.decode(model, int(rows.sum()) * n).reshape(-1, n).astype(np.int64) + offset
        assert coder.is_empty()
        return symbols


class ConstrictionClassCoder(rans.ClassCoder):
    """The codec's class coder as it was (shared tables, constriction), to time the whole codec
    with it in the same run."""

    def __init__(self) -> None:
        super().__init__("shared")
        self._ref = ConstrictionReference("shared")

    def encode(self, symbols, classes, out):
        words, _ = self._ref.encode(symbols, classes)
        out.put_count(len(words))
        out.put(words, "<u4")

    def decode(self, reader, classes, n):
        plan = []
        for c in rans._present(classes):
            a = int(rans.half_width(np.array([c]))[0])
            plan.append((int(c), -a, self._ref._model(int(c))))
        words = np.array(reader.take(reader.take_count(1 << 30, "word"), "<u4"), dtype=np.uint32)
        return self._ref.decode(words, plan, classes, n)


class _Recorder(rans.ClassCoder):
    """A class coder that keeps what the codec asks it to code."""

    def __init__(self, tables: str) -> None:
        super().__init__(tables)
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def encode(self, symbols, classes, out):
        self.calls.append((np.array(symbols), np.array(classes)))
        super().encode(symbols, classes, out)


def _kv(tokens: int, outliers: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(3, tokens, 64, generator=g)
    v = torch.randn(3, tokens, 64, generator=g)
    if outliers:
        k[:, :, :4] *= 10  # a few outlier channels, as real keys have
    return k.half(), v.half()


def _cpu_best(fn, calls: int, repeats: int = 5) -> float:
    """Best CPU seconds per call of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - t) / calls)
    return best


def _entropy_bits(symbols: np.ndarray, classes: np.ndarray) -> float:
    bits = 0.0
    for c in rans._present(classes):
        _, counts = np.unique(symbols[classes == c], return_counts=True)
        p = counts / counts.sum()
        bits += float(-(counts * np.log2(p)).sum())
    return bits


def _coder_row(tables: str, calls: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Size and decode time of the recorded ``calls`` with ``tables``, ours and constriction's."""
    coder = rans.ClassCoder(tables)
    n_sym = sum(s.size for s, _ in calls)
    streams = []
    for s, c in calls:
        w = Writer()
        coder.encode(s, c, w)
        streams.append((w.bytes(), c, s.shape[1]))
        assert np.array_equal(coder.decode(Reader(streams[-1][0], "bench"), c, s.shape[1]), s)
    new_bytes = sum(len(d) for d, _, _ in streams)
    entropy_bits = sum(_entropy_bits(s, c) for s, c in calls)

    def decode_new():
        for data, c, n in streams:
            coder.decode(Reader(data, "bench"), c, n)

    new_s = _cpu_best(decode_new, 3)
    new_enc_s = _cpu_best(lambda: [coder.encode(s, c, Writer()) for s, c in calls], 1, 3)
    row = {
        "tables": tables,
        "bits/sym entropy": entropy_bits / n_sym,
        "bits/sym new": 8 * new_bytes / n_sym,
        "size over entropy %": 100 * (8 * new_bytes / entropy_bits - 1),
        "new ns/sym": 1e9 * new_s / n_sym,
        "new MB/s": 2 * n_sym / new_s / 1e6,
        "new encode ns/sym": 1e9 * new_enc_s / n_sym,
    }
    if constriction is None:
        return row
    ref = ConstrictionReference(tables)
    old, old_bytes = [], 0
    for s, c in calls:
        words, plan = ref.encode(s, c)
        old_bytes += 4 * len(words) + 4  # + the u32 word count
        old.append((words, plan, c, s.shape[1]))
        assert np.array_equal(ref.decode(words, plan, c, s.shape[1]), s)
    if tables == "block":  # both store the same u8 tables
        old_bytes += _table_bytes(calls)

    def decode_old():
        for words, plan, c, n in old:
            ref.decode(words, plan, c, n)

    old_s = _cpu_best(decode_old, 3)
    old_enc_s = _cpu_best(lambda: [ref.encode(s, c) for s, c in calls], 1, 3)
    row.update({
        "bits/sym constriction": 8 * old_bytes / n_sym,
        "size over constriction %": 100 * (new_bytes / old_bytes - 1),
        "constriction ns/sym": 1e9 * old_s / n_sym,
        "constriction MB/s": 2 * n_sym / old_s / 1e6,
        "constriction encode ns/sym": 1e9 * old_enc_s / n_sym,
    })
    return row


def main() -> None:
    rows = []
    # Step settings of the codec (fractions of the head's RMS); the codec's defaults first.
    settings = {"codec default": {}, "k.05 v.1": {"key_step": 0.05, "value_step": 0.1},
                "k.2 v.4": {"key_step": 0.2, "value_step": 0.4}}
    blocks = 20
    for tokens in (16, 64):
        for outliers in (False, True):
            for name, params in settings.items():
                codec = CacheGenCodec(**params)
                own = codec._coder
                codec._coder = recorder = _Recorder("shared")
                layout = BlockLayout(3, tokens, 64, torch.float16)
                payloads = [codec.encode(*_kv(tokens, outliers, seed)) for seed in range(blocks)]
                codec._coder = own
                codec_s = _cpu_best(lambda: [codec.decode(p, layout, tokens, "cpu") for p in payloads], 2)
                if constriction is not None:
                    codec._coder = ConstrictionClassCoder()
                    old_payloads = [codec.encode(*_kv(tokens, outliers, seed)) for seed in range(blocks)]
                    old_codec_s = _cpu_best(
                        lambda: [codec.decode(p, layout, tokens, "cpu") for p in old_payloads], 2
                    )
                    codec._coder = own
                for tables in ("shared", "block"):
                    row = {"tokens": tokens, "outliers": outliers, "setting": name}
                    row.update(_coder_row(tables, recorder.calls))
                    if tables == "shared":
                        fp16 = blocks * 2 * layout.kv_heads * tokens * layout.head_dim * 2
                        row["codec decode MB/s"] = fp16 / codec_s / 1e6
                        if constriction is not None:
                            row["codec decode MB/s, constriction"] = fp16 / old_codec_s / 1e6
                    rows.append(row)
                    print_table([row])
    print()
    print_table(rows)
    write_results("bench_entropy", rows, blocks=blocks, constriction=constriction is not None)


def _table_bytes(calls: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """Bytes of the u8 block tables our coder writes for ``calls`` (the reference's tables are the
    same, so its size counts them too)."""
    total = 0
    for s, c in calls:
        for cls in rans._present(c):
            a = int(rans.half_width(np.array([cls]))[0])
            hist = np.bincount((s[c == cls] + a).reshape(-1), minlength=2 * a + 1)
            lo, hi = np.flatnonzero(hist)[[0, -1]]
            total += 4 + int(hi - lo + 1)
    return total


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
