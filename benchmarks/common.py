"""What every benchmark shares: the machine description, a table printer and the JSON writer."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
#: Torch intra-op threads of a benchmark unless ``--threads`` says otherwise. One: on the shared
#: 2-core machine, SmolLM2's ``generate`` with 2 threads took 1.9x as long as with 1 at load
#: average 2.6, and 5.3x as long beside one busy process (bench_threads.py).
DEFAULT_THREADS = 1


def machine() -> dict:
    """Where the figures were taken: device name, CPU count, torch version and threads."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    import os

    return {"device": gpu or f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}


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
    """Write ``rows`` and ``extra`` with the machine description to ``results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **extra, "rows": rows}, indent=2))
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
