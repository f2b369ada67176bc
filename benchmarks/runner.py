"""Runs the benchmarks of suites, each script in its own process, and says what it skipped.

Each script runs from the repository root as ``python benchmarks/<script> ARGS`` with the
checkout's ``tiercache`` first on the path (``PYTHONPATH``) and ``OMP_NUM_THREADS=1`` unless set
(on the shared 2-core machine a second OpenMP thread waits for a busy core: bench_threads.py). A
script that fails does not stop the others; the exit status says whether any failed.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .suites import SUITES, Bench

ROOT = Path(__file__).resolve().parent.parent
QUICK_RESULTS = Path(__file__).resolve().parent / "results" / "quick"


def selected(what: list[str], only: str | None) -> list[tuple[str, Bench]]:
    """``(suite, bench)`` of the suites named (``all``: every suite; ``gpu``: the GPU-only runs of
    every suite), in order, without repeats; ``only``: just the runs of these comma-separated JSON
    names."""
    names = list(SUITES) if "all" in what or "gpu" in what else what
    runs = [(s, b) for s in dict.fromkeys(names) for b in SUITES[s]]
    if "gpu" in what and "all" not in what:
        runs = [(s, b) for s, b in runs if b.gpu]
    wanted = None if only is None else set(only.split(","))
    return [(s, b) for s, b in runs if wanted is None or b.name in wanted]


def environment(suite_command: str, quick: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TIERCACHE_BENCH_SUITE"] = suite_command
    if quick:
        env["TIERCACHE_BENCH_RESULTS"] = str(QUICK_RESULTS)
    return env


def run_suites(what: list[str], quick: bool = False, only: str | None = None, timeout: float | None = None) -> int:
    """Run the benchmarks of ``what`` (suite names, ``all`` or ``gpu``); 1 if any failed, else 0."""
    import torch  # here, not at import: ``list`` and ``report`` need no torch

    cuda = torch.cuda.is_available()
    suite_command = shlex.join(["python", "-m", "benchmarks", *what, *(["--quick"] if quick else []),
                                *(["--only", only] if only else [])])
    env = environment(suite_command, quick)
    failed, done = [], []
    for suite, bench in selected(what, only):
        if bench.gpu and not cuda:
            print(f"[{suite}] skipped {bench.name}: needs a CUDA device ({bench.what})", flush=True)
            continue
        cmd = [sys.executable, f"benchmarks/{bench.script}", *(bench.quick if quick else bench.args)]
        print(f"[{suite}] {bench.name}: {shlex.join(cmd[1:])} (about {bench.minutes:g} min in full)", flush=True)
        start = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timed out"
        seconds = time.perf_counter() - start
        (done if rc == 0 else failed).append(f"{bench.name} ({seconds:.0f} s{'' if rc == 0 else f', {rc}'})")
    print(f"done: {', '.join(done) or 'none'}" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def listing() -> str:
    """The suites, each run's JSON name, rough minutes and question."""
    lines = []
    for suite, benches in SUITES.items():
        lines.append(f"{suite} (about {sum(b.minutes for b in benches if not b.gpu):g} min on the CPU):")
        lines += [f"  {b.name:24} {'GPU ' if b.gpu else ''}{b.minutes:g} min  {b.what}" for b in benches]
    return "\n".join(lines)
