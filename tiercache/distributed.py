"""Batch jobs on a Ray cluster (``tiercache batch jobs.jsonl --out answers.jsonl --store
redis://host:port/db --ray [ADDRESS]``): the same jobs, answers and resumption as
``jobs.run_batch``, answered by ``workers`` Ray actors sharing one Redis context tier.

- The driver reads the jobs file and the answers file (bad lines are reported with their
  numbers and skipped; answered questions are skipped), groups the pending questions by
  document and hands each group to a free actor, so each document is encoded once, by one
  actor; a document an earlier run (or another actor) stored is loaded from Redis instead.
- Each actor loads the model once (at start) and answers its group's questions one after the
  other from the loaded KV, streaming each answer back as it is done (a Ray streaming
  generator).
- Only the driver writes the answers file, each answer once (keyed by job id and question
  index), flushed and fsynced as it arrives: a driver killed at any moment leaves whole lines,
  and a rerun redoes no answered question.

The driver ships its own ``tiercache`` package to the workers (Ray's ``runtime_env``
``py_modules``), so that every worker runs the driver's version; the workers' machines need
tiercache's dependencies (``pip install 'tiercache[hf,ray]'``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from .contexts.store import ContextStore
from .errors import ConfigError, TiercacheError
from .io.redis_store import REDIS_SCHEMES
from .jobs import (
    BatchReport,
    Pending,
    Run,
    answer_questions,
    append_answer,
    open_answers,
    prepare_document,
    release_document,
    start_run,
)
from .stopping import DEFAULT_STOP

#: Counters of ``BatchReport`` that workers add up.
_SUMMED = ("answered", "encoded", "reused", "prefill_seconds", "load_seconds", "saved_seconds",
           "answer_tokens", "answer_seconds", "block_lookups", "device_hits")


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """How each worker loads its model and opens the shared store: checkpoint directory
    (``None``: the default model), dtype name, torch device, torch threads, the store's Redis
    address and its codec, the longest document (tokens), the retrieval budget and the attention
    implementation (``None``: transformers' choice for the family)."""

    store: str
    model: str | None = None
    dtype: str = "float32"
    device: str | None = None
    threads: int = 1
    codec: str = "cachegen"
    max_tokens: int = 32768
    budget: float | int = 1.0
    attn: str | None = None


class BatchWorker:
    """One Ray actor: a model, loaded once, and a ``ContextStore`` on the shared Redis tier."""

    def __init__(self, settings: WorkerSettings) -> None:
        import torch

        from .config import DTYPES, RetrievalConfig
        from .models import load_model

        torch.set_num_threads(settings.threads)
        model, tokenizer = load_model(settings.model, dtype=DTYPES[settings.dtype], device=settings.device,
                                      attn_implementation=settings.attn)
        self.store = ContextStore(settings.store, model, tokenizer, codec=settings.codec,
                                  max_tokens=settings.max_tokens,
                                  retrieval=RetrievalConfig(budget=settings.budget))
        self.report = BatchReport()

    def answer(self, group: Pending, max_new_tokens: int, stop) -> Iterator[dict]:
        """Encode or load the group's document once and yield each answer record; if the
        document cannot be prepared, one ``{"error", "lines"}`` record instead."""
        try:
            key, cache, info = prepare_document(self.store, group[0][0].document, self.report)
        except (TiercacheError, OSError) as exc:
            yield {"error": str(exc), "lines": [job.line for job, _ in group]}
            return
        try:
            for job, questions in group:
                yield from answer_questions(self.store, cache, key, info, job, questions, max_new_tokens,
                                            stop, self.report)
        finally:
            release_document(cache, self.report)

    def summary(self) -> dict:
        """This worker's process id, models loaded, and its share of the report's counters."""
        from .models import loads

        return {"pid": os.getpid(), "model_loads": loads(),
                **{name: getattr(self.report, name) for name in _SUMMED}}


def group_by_document(pending: Pending) -> list[Pending]:
    """The jobs with questions left, grouped by document text (first appearance first)."""
    groups: dict[str, Pending] = {}
    for job, questions in pending:
        if questions:
            groups.setdefault(hashlib.sha256(job.document.encode()).hexdigest(), []).append((job, questions))
    return list(groups.values())


def run_batch_ray(jobs_path: str | os.PathLike, out_path: str | os.PathLike, settings: WorkerSettings, *,
                  address: str | None = None, workers: int = 2, max_new_tokens: int = 32,
                  stop: str | Sequence[str] | None = DEFAULT_STOP, progress: bool = True) -> BatchReport:
    """``jobs.run_batch`` on Ray: ``workers`` actors (one CPU each, and one GPU each when
    ``settings.device`` is CUDA) on the cluster at ``address`` (``None``: a local cluster of
    ``workers`` CPUs, started and stopped here). ``settings.store`` must be a Redis address, the
    tier every worker shares. Returns the run's report; ``BatchReport.workers`` lists each
    actor's process and counters. ``ConfigError`` if Ray is not installed, the store is not
    shared, or the answers file cannot be written."""
    return answer_run_ray(start_run(jobs_path, out_path), settings, address=address, workers=workers,
                          max_new_tokens=max_new_tokens, stop=stop, progress=progress)


def answer_run_ray(run: Run, settings: WorkerSettings, *, address: str | None = None, workers: int = 2,
                   max_new_tokens: int = 32, stop: str | Sequence[str] | None = DEFAULT_STOP,
                   progress: bool = True) -> BatchReport:
    """Answer what ``run`` (``jobs.start_run``'s) has left, as ``run_batch_ray`` does. With
    nothing left, no cluster starts and no worker loads a model."""
    from tqdm import tqdm

    if not str(settings.store).startswith(REDIS_SCHEMES):
        raise ConfigError("--ray needs a context store every worker reaches: --store redis://host:port/db, "
                          f"not {settings.store!r}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    report = run.report
    groups = group_by_document(run.pending)
    if not groups:
        return report
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"--ray needs Ray: pip install 'tiercache[ray]' ({exc})") from None
    package = str(Path(__file__).resolve().parent)
    runtime_env = {"py_modules": [package], "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address is None:
        ray.init(num_cpus=workers, include_dashboard=False, runtime_env=runtime_env)
    else:
        ray.init(address=address, runtime_env=runtime_env)
    try:
        gpus = 1 if settings.device is not None and str(settings.device).startswith("cuda") else 0
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(BatchWorker)
        actors = [actor.remote(settings) for _ in range(min(workers, len(groups)))]
        with open_answers(run.out) as sink, tqdm(total=run.questions, unit="q", disable=not progress,
                                                 desc="answering") as bar:
            _drive(ray, actors, groups, sink, report, bar, run.jobs_path, max_new_tokens, stop)
        summaries = ray.get([a.summary.remote() for a in actors])
    finally:
        ray.shutdown()
    for s in summaries:
        for name in _SUMMED:
            setattr(report, name, getattr(report, name) + s[name])
    report.workers = summaries
    report.saved_seconds -= report.prefill_seconds + report.load_seconds
    return report


def _drive(ray, actors: list, groups: list[Pending], sink, report: BatchReport, bar, jobs_path,
           max_new_tokens: int, stop) -> None:
    """Keep every actor busy with one group at a time; write each answer as it arrives. A group
    whose actor fails is reported and left for a rerun, and the actor is not used again."""
    todo = list(reversed(groups))
    free = list(actors)
    running: dict = {}  # streaming generator -> (actor, group)
    written: set[tuple[str | int, int]] = set()
    while todo or running:
        while free and todo:
            worker, group = free.pop(), todo.pop()
            gen = worker.answer.options(num_returns="streaming").remote(group, max_new_tokens, stop)
            running[gen] = (worker, group)
        if not running:  # every worker failed
            for group in todo:
                _skip(report, bar, jobs_path, group, "no Ray worker left", written)
            return
        [gen], _ = ray.wait(list(running), num_returns=1)
        try:
            record = ray.get(next(gen))
        except StopIteration:
            free.append(running.pop(gen)[0])
            continue
        except ray.exceptions.RayError as exc:
            _skip(report, bar, jobs_path, running.pop(gen)[1], f"worker failed: {exc}", written)
            continue
        if "error" in record:
            _skip(report, bar, jobs_path, running[gen][1], record["error"], written)
            continue
        if (record["job"], record["index"]) not in written:  # exactly once, even if a task is retried
            append_answer(sink, record)
            written.add((record["job"], record["index"]))
            bar.update(1)


def _skip(report: BatchReport, bar, jobs_path, group: Pending, reason: str, written: set) -> None:
    for job, questions in group:
        report.bad_lines.append((job.line, reason))
        print(f"{jobs_path}:{job.line}: skipped: {reason}", file=sys.stderr)
        bar.update(sum(1 for i, _ in questions if (job.id, i) not in written))


__all__ = ["BatchWorker", "WorkerSettings", "answer_run_ray", "group_by_document", "run_batch_ray"]
