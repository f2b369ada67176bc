"""``python -m benchmarks``: run suites of benchmarks, or write RESULTS.md from their JSON.

    python -m benchmarks tiers decode [--quick] [--only NAME,...] [--timeout S]
    python -m benchmarks all          # every suite
    python -m benchmarks gpu          # the GPU-only benchmarks of every suite
    python -m benchmarks list         # the suites, their scripts and rough minutes
    python -m benchmarks report       # RESULTS.md (and the plots, with matplotlib) from results/*.json
"""

from __future__ import annotations

import argparse
import sys

from .suites import SUITES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="+", choices=[*SUITES, "all", "gpu", "list", "report"],
                    help="suites to run, 'all', 'gpu', 'list', or 'report'")
    ap.add_argument("--quick", action="store_true",
                    help="smoke runs: short arguments, results under benchmarks/results/quick/")
    ap.add_argument("--only", default=None, help="only these runs: comma-separated JSON names (see 'list')")
    ap.add_argument("--timeout", type=float, default=None, help="seconds each script may run")
    ap.add_argument("--no-plots", action="store_true", help="report: leave the plots as they are")
    args = ap.parse_args(argv)
    if args.what == ["list"]:
        from .runner import listing

        print(listing())
        return 0
    if args.what == ["report"]:
        from .report import write_report

        write_report(plots=not args.no_plots)
        return 0
    if {"list", "report"} & set(args.what):
        ap.error("'list' and 'report' go alone")
    from .runner import run_suites

    return run_suites(args.what, quick=args.quick, only=args.only, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
