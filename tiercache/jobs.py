"""Offline batch jobs over stored contexts: a JSON-lines jobs file (``{"document": text | "path":
file, "questions": [...]}`` per line, with an optional ``"id"``) answered into a JSON-lines
answers file, one line per answer, flushed and fsynced as it is written.

Answers are keyed by job (its ``"id"``, else its line number) and question index, so a question
asked twice is answered twice; a rerun skips the answers already written. A bad job line (not
UTF-8, not JSON, not a job) is reported with its number and skipped, never fatal. Each document's
KV is encoded once into a ``ContextStore`` and its questions are answered from the loaded KV.
``tiercache.distributed.run_batch_ray`` runs the same jobs on a Ray cluster.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .contexts.store import ContextInfo, ContextStore
from .errors import BlockNotFoundError, ConfigError, CorruptBlockError, StoreError, TiercacheError
from .generation import ask_cache
from .hf.cache import TieredCache
from .stopping import DEFAULT_STOP


@dataclass(frozen=True)
class Job:
    """One valid line of a jobs file: ``line`` (1-based), the document text, its questions, and
    ``id``: the line's ``"id"`` (a str) if it has one, else ``line`` (an int)."""

    line: int
    document: str
    questions: list[str]
    id: str | int


@dataclass
class BatchReport:
    """What a ``run_batch`` did. Times in seconds, sizes in tokens.

    ``saved_seconds``: prefill time the stored contexts saved against prefilling the document
    for every question answered: sum over answers of the document's measured prefill time, minus
    the time spent encoding and loading in this run.
    """

    answered: int = 0
    already_answered: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    encoded: int = 0
    reused: int = 0
    prefill_seconds: float = 0.0
    load_seconds: float = 0.0
    saved_seconds: float = 0.0
    answer_tokens: int = 0
    answer_seconds: float = 0.0
    block_lookups: int = 0
    device_hits: int = 0
    #: On Ray (``distributed.run_batch_ray``): each worker's process id, models loaded and counters.
    workers: list[dict] = field(default_factory=list)

    @property
    def device_hit_rate(self) -> float:
        """Share of block reads served by the device tier while answering."""
        return self.device_hits / self.block_lookups if self.block_lookups else 0.0


def read_jobs(path: str | os.PathLike) -> tuple[list[Job], list[tuple[int, str]]]:
    """The valid jobs of JSON-lines file ``path`` and the bad lines as (line number, reason).
    Each line is decoded on its own, so one that is not UTF-8 is a bad line like any other.
    ``"path"`` documents are read relative to the jobs file. ``ConfigError`` if the file itself
    cannot be read."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read jobs file {path}: {exc.strerror or exc}") from exc
    jobs, bad = [], []
    lines_of: dict[str | int, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad.append((number, f"not UTF-8 text ({exc.reason} at byte {exc.start})"))
            continue
        if not text.strip():
            continue
        try:
            job = _parse_job(number, text, path.parent)
        except _BadJob as exc:
            bad.append((number, str(exc)))
            continue
        if job.id in lines_of:
            bad.append((number, f"job id {job.id!r} is taken by line {lines_of[job.id]}"))
            continue
        lines_of[job.id] = number
        jobs.append(job)
    return jobs, bad


class _BadJob(Exception):
    """A jobs-file line that cannot be run (reported and skipped, never fatal)."""


def _parse_job(number: int, text: str, base: Path) -> Job:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise _BadJob(f"bad JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _BadJob("a job must be a JSON object")
    if ("document" in doc) == ("path" in doc):
        raise _BadJob('a job needs exactly one of "document" (text) and "path" (a file)')
    questions = doc.get("questions")
    if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise _BadJob('"questions" must be a non-empty list of non-empty strings')
    job_id = doc.get("id", number)
    if "id" in doc:
        if isinstance(job_id, bool) or not isinstance(job_id, (str, int)) or not str(job_id).strip():
            raise _BadJob('"id" must be a non-empty string or an integer')
        job_id = str(job_id)  # a str, so that it never collides with another line's number
    if "document" in doc:
        document = doc["document"]
        if not isinstance(document, str):
            raise _BadJob('"document" must be a string')
    else:
        file = base / str(doc["path"])
        try:
            document = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _BadJob(f"cannot read document {file}: {exc}") from None
    return Job(number, document, questions, job_id)


def check_answers_path(out: str | os.PathLike) -> Path:
    """``out`` as a path the answers file can be appended at; ``ConfigError`` saying why not."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"answers file {out} is a directory; name a file (JSON lines) to write")
    if not out.parent.is_dir():
        raise ConfigError(f"answers file {out}: directory {out.parent} does not exist")
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise ConfigError(f"answers file {out} is not writable")
    return out


def _answered(out: Path) -> set[tuple[str | int, int]]:
    """The (job id, question index) pairs ``out`` holds. A torn last line (a crash mid-write) is
    cut off, so appending continues on a line boundary."""
    if not out.exists():
        return set()
    try:
        data = out.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(out, "r+b") as f:
                f.truncate(end)
    except OSError as exc:
        raise ConfigError(f"cannot read answers file {out}: {exc.strerror or exc}") from exc
    done = set()
    for raw in data[:end].splitlines():
        try:
            rec = json.loads(raw)
            job = rec["job"]
            if isinstance(job, (str, int)) and not isinstance(job, bool):
                done.add((job, int(rec["index"])))
        except (ValueError, KeyError, TypeError):
            continue
    return done


Pending = list[tuple[Job, list[tuple[int, str]]]]


@dataclass
class Run:
    """What a run has to do: its jobs file, the answers file, each valid job with its questions
    not answered yet (index, text), and the report it fills (holding the bad lines and the
    questions answered before)."""

    jobs_path: str | os.PathLike
    out: Path
    pending: Pending
    report: BatchReport

    @property
    def questions(self) -> int:
        """Questions left to answer."""
        return sum(len(qs) for _, qs in self.pending)


def start_run(jobs_path: str | os.PathLike, out_path: str | os.PathLike) -> Run:
    """Read the jobs file and the answers file: what is left to answer. Bad lines are printed to
    stderr with their numbers. ``ConfigError`` if either file cannot be read or the answers file
    cannot be written."""
    out = check_answers_path(out_path)
    jobs, bad = read_jobs(jobs_path)
    done = _answered(out)
    report = BatchReport(bad_lines=bad)
    for number, reason in bad:
        print(f"{jobs_path}:{number}: skipped: {reason}", file=sys.stderr)
    pending = [(job, [(i, q) for i, q in enumerate(job.questions) if (job.id, i) not in done])
               for job in jobs]
    report.already_answered = sum(len(job.questions) - len(qs) for job, qs in pending)
    return Run(jobs_path, out, pending, report)


def open_answers(out: Path):
    """The answers file, opened for appending; ``ConfigError`` if it cannot be."""
    try:
        return open(out, "a", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot open answers file {out}: {exc.strerror or exc}") from exc


def append_answer(sink, record: dict) -> None:
    """Append one answer record as a line, durably (flushed and fsynced) before returning."""
    sink.write(json.dumps(record) + "\n")
    sink.flush()
    os.fsync(sink.fileno())


def run_batch(jobs_path: str | os.PathLike, out_path: str | os.PathLike, store: ContextStore, *,
              max_new_tokens: int = 32, stop: str | Sequence[str] | None = DEFAULT_STOP,
              progress: bool = True, on_answer: Callable[[dict], None] | None = None) -> BatchReport:
    """Answer every question of ``jobs_path`` into ``out_path`` (JSON lines ``{"job", "index",
    "line", "question", "answer", "context"}``: the job's id, the question's index in it, the
    job's line), skipping those answered by an earlier run. Each document is encoded once into
    ``store``; its questions are answered from the loaded KV, one after the other (the cache is
    truncated back after each); answers end as ``generation.greedy_answer`` says (``max_new_tokens``,
    ``stop``). ``on_answer`` sees each record after it is durably written. Bad lines go to stderr
    and ``BatchReport.bad_lines``. ``ConfigError`` if ``out_path`` cannot be written."""
    return answer_run(start_run(jobs_path, out_path), store, max_new_tokens=max_new_tokens, stop=stop,
                      progress=progress, on_answer=on_answer)


def answer_run(run: Run, store: ContextStore, *, max_new_tokens: int = 32,
               stop: str | Sequence[str] | None = DEFAULT_STOP, progress: bool = True,
               on_answer: Callable[[dict], None] | None = None) -> BatchReport:
    """Answer what ``run`` (``start_run``'s) has left, as ``run_batch`` does; returns its report."""
    from tqdm import tqdm

    report = run.report
    # Closed before an exception (Ctrl-C) leaves, so the bar is not drawn again after its message.
    with tqdm(total=run.questions, unit="q", disable=not progress, desc="answering") as bar, \
            open_answers(run.out) as sink:
        for job, questions in run.pending:
            if not questions:
                continue
            try:
                key, cache, info = prepare_document(store, job.document, report)
            except (TiercacheError, OSError) as exc:
                report.bad_lines.append((job.line, str(exc)))
                print(f"{run.jobs_path}:{job.line}: skipped: {exc}", file=sys.stderr)
                bar.update(len(questions))
                continue
            try:
                for record in answer_questions(store, cache, key, info, job, questions, max_new_tokens, stop,
                                               report):
                    append_answer(sink, record)
                    bar.set_postfix(_postfix(report, cache), refresh=False)
                    bar.update(1)
                    if on_answer is not None:
                        on_answer(record)
            finally:
                release_document(cache, report)
    report.saved_seconds -= report.prefill_seconds + report.load_seconds
    return report


def prepare_document(store: ContextStore, document: str,
                     report: BatchReport) -> tuple[str, TieredCache, ContextInfo | None]:
    """Encode (or find) ``document`` in ``store`` and load its KV: its key, a cache holding it (the
    caller hands it to ``release_document``) and what encoding measured. A stored context found
    missing parts (evicted from a shared tier since ``encode`` saw it) or refused (damaged) is
    encoded again, once."""
    misses, prefill_seconds = store.misses, store.prefill_seconds
    key = store.encode(document)
    start = time.perf_counter()
    try:
        cache = store.load(key)
    except (BlockNotFoundError, CorruptBlockError) as exc:
        print(f"tiercache: context {key[:16]}: {exc}; encoding it again", file=sys.stderr)
        key = store.encode(document, force=True)
        start = time.perf_counter()
        try:
            cache = store.load(key)
        except BlockNotFoundError as exc:  # gone again at once: a budget too small
            raise StoreError(f"context {key[:16]}... was evicted before use; raise the store's "
                             "budget") from exc
    report.load_seconds += time.perf_counter() - start
    encoded = store.misses - misses
    report.encoded += encoded
    report.reused += not encoded
    report.prefill_seconds += store.prefill_seconds - prefill_seconds
    return key, cache, store.info(key)


def answer_questions(store: ContextStore, cache: TieredCache, key: str, info: ContextInfo | None, job: Job,
                     questions: Sequence[tuple[int, str]], max_new_tokens: int,
                     stop: str | Sequence[str] | None,
                     report: BatchReport) -> Iterator[dict]:
    """Answer ``questions`` (index, text) of ``job`` from ``cache`` (context ``key``) one after
    the other, yielding each answer record as it is done."""
    for index, question in questions:
        start = time.perf_counter()
        answer = ask_cache(store.model, store.tokenizer, cache, question, max_new_tokens, stop)
        report.answer_seconds += time.perf_counter() - start
        report.answer_tokens += len(store.tokenizer(answer, add_special_tokens=False)["input_ids"])
        report.answered += 1
        if info is not None:
            report.saved_seconds += info.prefill_seconds
        yield {"job": job.id, "index": index, "line": job.line, "question": question, "answer": answer,
               "context": key}


def release_document(cache: TieredCache, report: BatchReport) -> None:
    """Count the block reads answering took and close ``cache``."""
    try:
        stats = cache.manager.stats()
        report.block_lookups += stats.lookups
        report.device_hits += stats.hits["device"]
    finally:
        cache.close()


def _postfix(report: BatchReport, cache: TieredCache) -> dict[str, str]:
    """tqdm's postfix: answer tokens/s, stored-context hit rate, device hit rate of block reads
    so far (the report counts documents done; ``cache`` is the one being answered from)."""
    contexts = report.encoded + report.reused
    stats = cache.manager.stats()
    lookups = report.block_lookups + stats.lookups
    return {
        "tok/s": f"{report.answer_tokens / report.answer_seconds:.1f}" if report.answer_seconds else "-",
        "ctx hit": f"{report.reused}/{contexts}",
        "dev hit": f"{(report.device_hits + stats.hits['device']) / lookups:.2f}" if lookups else "-",
    }
