"""``tiercache batch JOBS --out ANSWERS``: answer a JSON-lines file of document questions from KV
encoded once per document (here, or on a Ray cluster)."""

from __future__ import annotations

import argparse

from .options import CODEC_NAMES, answer_options, budget, positive


def register(commands, model_options: argparse.ArgumentParser) -> None:
    """Add the ``batch`` command to ``commands`` (argparse subparsers)."""
    batch = commands.add_parser("batch", help="answer a JSON-lines file of document questions",
                                description=run.__doc__, parents=[model_options, answer_options(32)])
    batch.add_argument("jobs", help="jobs file, one JSON object per line")
    batch.add_argument("--out", required=True, help="answers file (JSON lines; appended, resumable)")
    batch.add_argument("--store", default=None,
                       help="context store: a directory (default $TIERCACHE_HOME/contexts) or a Redis "
                            "server, redis://host:port/db, that many workers share")
    batch.add_argument("--codec", choices=CODEC_NAMES, default="cachegen",
                       help="codec of stored KV (default cachegen; zstd is lossless)")
    batch.add_argument("--max-tokens", type=positive, default=32768,
                       help="longest document in tokens (default 32768)")
    batch.add_argument("--budget", type=budget, default=1.0,
                       help="retrieval budget each answer step attends: a fraction of the document (0.5) "
                            "or a number of tokens (512) (default 1.0)")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    batch.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on a Ray cluster (pip install 'tiercache[ray]'): at ADDRESS (e.g. auto, "
                            "ray://host:10001), or without one on a local cluster of --workers CPUs; needs "
                            "--store redis://...")
    batch.add_argument("--workers", type=positive, default=2,
                       help="Ray actors, each loading the model once (default 2)")
    batch.set_defaults(func=run, interrupted=interrupted)


def run(args: argparse.Namespace) -> int:
    """Answer the questions of a JSON-lines jobs file ({"document": text | "path": file,
    "questions": [...], "id": optional} per line) into a JSON-lines answers file, one answer per
    (job id or line number, question index). Each document's KV is encoded once and stored in
    the context store (a directory, or a Redis server shared by many workers); reruns skip what
    is answered already (with nothing left, no model loads); bad lines are reported and skipped.
    Ctrl-C keeps every answer written and prints the command that resumes. With --ray, the jobs
    run on a Ray cluster: documents are spread over --workers actors sharing a Redis context
    store."""
    from ..contexts.store import ContextStore
    from ..config import RetrievalConfig
    from ..jobs import answer_run, start_run
    from ..paths import cache_home
    from .options import load

    run = start_run(args.jobs, args.out)  # a bad --out or jobs file is reported before anything loads
    if not run.questions:
        _summary(run.report)
        print("nothing left to answer: no model was loaded")
        return 0
    store_path = args.store or str(cache_home() / "contexts")
    if args.ray is not None:
        from ..distributed import WorkerSettings, answer_run_ray

        settings = WorkerSettings(store_path, args.model, args.dtype, args.device, args.threads, args.codec,
                                  args.max_tokens, args.budget, args.attn)
        report = answer_run_ray(run, settings, address=None if args.ray == "local" else args.ray,
                                workers=args.workers, max_new_tokens=args.max_new_tokens, stop=args.stop,
                                progress=not args.quiet)
    else:
        model, tok = load(args)
        with ContextStore(store_path, model, tok, codec=args.codec, max_tokens=args.max_tokens,
                          retrieval=RetrievalConfig(budget=args.budget)) as store:
            report = answer_run(run, store, max_new_tokens=args.max_new_tokens, stop=args.stop,
                                progress=not args.quiet)
    _summary(report)
    return 0


def _summary(r) -> None:
    """What a run did (``r``: its ``jobs.BatchReport``)."""
    print(f"answered {r.answered} questions ({r.already_answered} already answered before); "
          f"{len(r.bad_lines)} bad job lines skipped")
    if r.answered:
        print(f"documents: {r.encoded} encoded (prefill {r.prefill_seconds:.1f} s), {r.reused} found stored; "
              f"loading KV took {r.load_seconds:.1f} s")
        print(f"prefill time saved vs prefilling the document for every question: {r.saved_seconds:.1f} s; "
              f"device hit rate {r.device_hit_rate:.2f}; "
              f"answers {r.answer_tokens / r.answer_seconds if r.answer_seconds else 0:.1f} tokens/s")
    for w in r.workers:
        print(f"ray worker pid {w['pid']}: {w['model_loads']} model load(s), {w['encoded']} documents "
              f"encoded, {w['reused']} loaded from the store, {w['answered']} answers")


def interrupted(args: argparse.Namespace, command: str) -> str:
    """What Ctrl-C leaves: the answers written so far, and the command that resumes."""
    from pathlib import Path

    out = Path(args.out)
    kept = sum(1 for _ in out.open("rb")) if out.is_file() else 0
    return f"; {kept} answers are in {out}, and this resumes the run: {command}"
