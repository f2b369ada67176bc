"""What every benchmark shares: where results go, the run's record (command, machine, date), a
table printer and the JSON writer.

Every ``results/<name>.json`` carries a ``run`` record: the command that reproduces it (run from
the repository root), the suite command it came from when ``python -m benchmarks`` ran it, the
git commit, the date and the wall seconds; and a ``machine`` record: device, CPU count, torch
version and threads, and the load average before and after (on a shared machine only ratios
taken in one run mean anything, and the load says how shared it was).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from tiercache.corpus import text_tokens

ROOT = Path(__file__).resolve().parent.parent
#: Where results go: ``results/`` (what RESULTS.md is made from), unless the runner points a
#: quick run elsewhere (``TIERCACHE_BENCH_RESULTS``) so that it never replaces a full run's JSON.
RESULTS = Path(os.environ.get("TIERCACHE_BENCH_RESULTS", Path(__file__).parent / "results"))
#: The suite command that started this script, set by ``python -m benchmarks`` (absent when run by hand).
SUITE_ENV = "TIERCACHE_BENCH_SUITE"
#: Torch intra-op threads of a benchmark unless ``--threads`` says otherwise. One: on the shared
#: 2-core machine, SmolLM2's ``generate`` with 2 threads took 1.9x as long as with 1 at load
#: average 2.6, and 5.3x as long beside one busy process (bench_threads.py).
DEFAULT_THREADS = 1
#: The 8-layer Llama shape of the CPU decode benchmarks (hidden 256, 8 query and 2 KV heads): a
#: step costs little next to the cache, and GQA is there as in real models.
TINY_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096)
_STARTED = (time.time(), os.getloadavg())


def machine() -> dict:
    """Where the figures were taken: device name, CPU count, torch version and threads, and the
    load average (1, 5 and 15 minutes) when the script started and now."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cpus = os.cpu_count()
    return {"device": gpu or f"CPU ({platform.processor() or platform.machine()}, {cpus} cores)",
            "cpu_count": cpus, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_start": [round(x, 2) for x in _STARTED[1]],
            "load_average_end": [round(x, 2) for x in os.getloadavg()]}


def command() -> str:
    """The shell command that reruns this script as it was run, from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    return " ".join(filter(None, [env, "PYTHONPATH=. python", shlex.join([str(script), *sys.argv[1:]])]))


def run_record() -> dict:
    """The ``run`` record of a result: command, suite, commit, date and seconds so far."""
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"command": command(), "suite": os.environ.get(SUITE_ENV), "commit": commit,
            "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - _STARTED[0], 1)}


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser.parse_args()`` with a ``--threads`` option (torch intra-op threads, default
    ``DEFAULT_THREADS``), applied before the benchmark starts."""
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"torch intra-op threads (default {DEFAULT_THREADS}; see bench_threads.py)")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    return args


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print ``rows`` as an aligned text table (floats to 3 significant digits)."""
    if not rows:
        return
    columns = columns or list(rows[0])
    fmt = [[f"{r.get(c):.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in fmt)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in fmt:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)))


def write_results(name: str, rows: list[dict], **extra: object) -> Path:
    """Write ``rows`` and ``extra`` with the run and machine records to ``results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"run": run_record(), "machine": machine(), **extra, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def best_of(fn, repeats: int = 5) -> float:
    """Smallest wall time of ``repeats`` calls of ``fn`` in seconds (synchronising CUDA)."""
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def warm_up(codec, layout) -> None:
    """One random block of ``layout`` through ``codec`` and back, untimed. The first use of the
    cachegen codec compiles its rANS kernels (numba; cached on disk per checkout, so a fresh
    checkout pays it once), which no timed figure should include."""
    k = torch.randn(layout.kv_heads, layout.block_tokens, layout.head_dim).to(layout.dtype)
    codec.decode(codec.encode_at(k, k, 0, layout.block_tokens), layout, layout.block_tokens, "cpu")


def random_llama(shape: dict, **config: object):
    """A Llama model of ``shape`` (``LlamaConfig`` fields; ``config`` adds more) with random
    weights from seed 0, in eval mode: speed and bytes need no trained weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**shape, **config)).eval()


def dense_kv(cache) -> torch.Tensor:
    """A transformers cache's KV as ``(layers, 2, kv_heads, tokens, head_dim)`` (batch row 0)."""
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])


def qa_streams(tok, streams: int = 2, tokens: int = 4096) -> list[tuple[list[int], list]]:
    """The stream-QA cases: ``(stream ids, facts)`` of ``streams`` streams of ``tokens`` tokens of
    the reference text, sharing out ``QA_FACTS`` and holding them from 5% to 60% depth."""
    from tiercache.evaluation import QA_FACTS, plant_facts

    out = []
    for stream in range(streams):
        facts = QA_FACTS[stream::streams]
        ids = plant_facts(tok, text_tokens(tok, tokens, offset_tokens=1000 + 12000 * stream), facts,
                          first=0.05, last=0.6)
        out.append((ids, facts))
    return out
