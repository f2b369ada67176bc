"""Offline batch jobs (CacheGen / LMCache style): encode each document's KV once, keep it
compressed under a content key (on disk, or in Redis shared by many workers), and answer many
questions from it in this or any later process, loading the KV instead of recomputing the
prefill.

- ``ContextStore``: ``encode(document) -> key`` (``content_key`` of the model's fingerprint and
  the token ids; nothing is recomputed when the key is stored already), ``load(key) ->
  TieredCache``. Records live in a ``ContextBackend``: a ``DiskStore`` directory (persistent
  index, checksums on every read, single writer) or a Redis server (``tiercache.io.redis_store``);
  beside them, what was measured at encode time (tokens, prefill seconds, bytes, fingerprint).
- ``run_batch``: a JSON-lines jobs file (``{"document": text | "path": file, "questions": [...]}``
  per line, with an optional ``"id"``) answered into a JSON-lines answers file, one line per
  answer, flushed and fsynced as it is written. Answers are keyed by job (its ``"id"``, else its
  line number) and question index, so a question asked twice is answered twice; a rerun skips the
  answers already written. A bad job line (not UTF-8, not JSON, not a job) is reported with its
  number and skipped, never fatal. ``tiercache.distributed.run_batch_ray`` runs the same jobs
  on a Ray cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .hf.cache import TieredCache, default_config
from .config import RetrievalConfig, TierConfig
from .blocks import BlockLayout
from .errors import BlockNotFoundError, ConfigError, CorruptBlockError, ShapeError, StoreError, TiercacheError
from .fingerprint import kv_shape, model_fingerprint, model_id, storage_fingerprint
from .io.backends import open_contexts
from .io.codec import make_codec
from .io.contexts import CHUNK_TOKENS, content_key, load_kv_context, save_kv_context
from .stopping import DEFAULT_STOP
from .generation import ask_cache

#: Tokens per forward when encoding a document (bounds the score tensors of the prefill).
_PREFILL_CHUNK = 512
#: Tokens a default config leaves beyond a document for a question and its answer.
_ROOM_TOKENS = 512


@dataclass(frozen=True)
class ContextInfo:
    """What ``ContextStore.encode`` measured for one context: ``tokens``, ``prefill_seconds`` (the
    prefill it saves each later use), ``raw_bytes`` of KV and ``stored_bytes`` in the store, and
    the ``fingerprint`` of the KV (``Fingerprint.to_json()``)."""

    key: str
    tokens: int
    prefill_seconds: float
    raw_bytes: int
    stored_bytes: int
    codec: str
    fingerprint: dict = field(default_factory=dict)


def prefill(model, config: TierConfig, ids: list[int]) -> TieredCache:
    """A ``TieredCache`` holding ``ids`` prefilled with full attention, ``_PREFILL_CHUNK``
    tokens per forward (exact; the device never holds more than ``config``'s budget)."""
    cache = TieredCache(model, config, prefill="full")
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for a in range(0, len(ids), _PREFILL_CHUNK):
                model(torch.tensor([ids[a : a + _PREFILL_CHUNK]], device=device), past_key_values=cache,
                      use_cache=True)
    except BaseException:
        cache.close()
        raise
    cache.prefill = "retrieval"
    return cache


class ContextStore:
    """Documents' KV caches under content keys, in a local directory or a shared Redis server.

    ``where``: a directory (a ``DiskStore``, created; one writer at a time) or a Redis address
    (``"redis://host:port/db"``: shared by every process and machine that can reach it).
    ``codec`` / ``codec_params``: the encoding of stored KV (``"cachegen"``, ``"quant"``,
    ``"zstd"`` (lossless), ``"raw"``). ``config``: the tiers a context is prefilled and loaded
    into (default: ``default_config`` sized for the document plus ``_ROOM_TOKENS`` of question and
    answer; a disk tier, if any, must live elsewhere). ``retrieval``: the retrieval settings of
    that default config. ``budget_bytes``: bytes a directory store may hold (older contexts are
    evicted, least recently used first; a Redis server's own ``maxmemory`` bounds it there).
    ``max_tokens``: longest document accepted.

    Keys are ``content_key(fingerprint.digest, token ids)``: ``fingerprint`` covers the model's
    config, weights and dtype, the KV layout, the codec and the record format, so another model
    or setting never finds these contexts, and loading one it names anyway is refused.
    """

    def __init__(self, where: str | os.PathLike, model, tokenizer, codec: str = "cachegen", *,
                 codec_params: dict | None = None, config: TierConfig | None = None,
                 retrieval: RetrievalConfig | None = None,
                 budget_bytes: int = 16 << 30, max_tokens: int = 32768) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        self.where = where
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id(model)
        self.codec_name = codec
        self.codec = make_codec(codec, **(codec_params or {}))
        self.config = config
        self.retrieval = retrieval
        self.max_tokens = max_tokens
        layers, kv_heads, head_dim = kv_shape(model.config)
        layout = BlockLayout(kv_heads, CHUNK_TOKENS, head_dim, model.dtype)
        self.fingerprint = storage_fingerprint(model_fingerprint(model), layers, layout, self.codec)
        self.backend = open_contexts(where, budget_bytes)
        #: Contexts found already stored by ``encode`` / encoded anew, since this store opened,
        #: and the seconds those prefills took.
        self.hits = 0
        self.misses = 0
        self.prefill_seconds = 0.0

    def tokens(self, document: str) -> list[int]:
        """Token ids of ``document``; ``ShapeError`` if empty or longer than ``max_tokens``."""
        if not isinstance(document, str) or not document.strip():
            raise ShapeError("the document is empty")
        ids = self.tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_tokens:
            raise ShapeError(f"the document has {len(ids)} tokens, more than max_tokens={self.max_tokens}")
        return ids

    def key(self, document: str) -> str:
        """The content key ``document`` is stored under (this store's fingerprint and its token ids)."""
        return content_key(self.fingerprint.digest, self.tokens(document))

    def encode(self, document: str, force: bool = False) -> str:
        """Store the KV of ``document`` (prefilled with full attention, in chunks) unless it is
        stored already (``force``: store it again, e.g. after a load found it evicted); return
        its key."""
        ids = self.tokens(document)
        key = content_key(self.fingerprint.digest, ids)
        if not force and self.backend.has_context(key):
            self.hits += 1
            return key
        self.misses += 1
        start = time.perf_counter()
        cache = prefill(self.model, self._config(len(ids)), ids)
        prefill_seconds = time.perf_counter() - start
        self.prefill_seconds += prefill_seconds
        try:
            kv = cache.export_kv()
        finally:
            cache.close()
        stored = save_kv_context(self.backend, key, kv, self.codec, self.fingerprint, CHUNK_TOKENS)
        info = ContextInfo(key, len(ids), prefill_seconds, kv.numel() * kv.element_size(), stored,
                           self.codec_name, self.fingerprint.to_json())
        self.backend.put_context_meta(key, vars(info))
        return key

    def load(self, key: str) -> TieredCache:
        """A fresh ``TieredCache`` holding context ``key`` (imported, no prefill); the caller
        closes it. ``BlockNotFoundError`` if the store does not hold ``key`` whole,
        ``FingerprintError`` if it holds KV of another model or setting under it."""
        kv = load_kv_context(self.backend, key, self.fingerprint)
        cache = TieredCache(self.model, self._config(kv.shape[3]), prefill="retrieval")
        try:
            cache.import_kv(kv.to(cache.layout.dtype))
        except BaseException:
            cache.close()
            raise
        return cache

    def info(self, key: str) -> ContextInfo | None:
        """What was measured when ``key`` was encoded (None if not known to this store)."""
        meta = self.backend.context_meta(key)
        try:
            return ContextInfo(**meta) if meta is not None else None
        except TypeError:  # written by another version: a description only
            return None

    def close(self) -> None:
        """Release the store (a directory's writer lock, a server's connections)."""
        self.backend.close()

    def __enter__(self) -> "ContextStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _config(self, tokens: int) -> TierConfig:
        if self.config is not None:
            return self.config
        config = default_config(self.model, context_tokens=tokens + _ROOM_TOKENS)
        # The tiers' device is the model's (default_config would pick CUDA whenever present).
        config = dataclasses.replace(config, device=next(self.model.parameters()).device)
        return dataclasses.replace(config, retrieval=self.retrieval) if self.retrieval else config


# ---------------------------------------------------------------------- jobs


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


def start_run(jobs_path: str | os.PathLike, out_path: str | os.PathLike) -> tuple[Path, Pending, BatchReport]:
    """What a run has to do: the answers file, each valid job with its questions not answered yet
    (index, text), and a report holding the bad lines (also printed to stderr with their
    numbers) and the questions answered before."""
    out = check_answers_path(out_path)
    jobs, bad = read_jobs(jobs_path)
    done = _answered(out)
    report = BatchReport(bad_lines=bad)
    for number, reason in bad:
        print(f"{jobs_path}:{number}: skipped: {reason}", file=sys.stderr)
    pending = [(job, [(i, q) for i, q in enumerate(job.questions) if (job.id, i) not in done])
               for job in jobs]
    report.already_answered = sum(len(job.questions) - len(qs) for job, qs in pending)
    return out, pending, report


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
    from tqdm import tqdm

    out, pending, report = start_run(jobs_path, out_path)
    bar = tqdm(total=sum(len(qs) for _, qs in pending), unit="q", disable=not progress, desc="answering")
    with open_answers(out) as sink:
        for job, questions in pending:
            if not questions:
                continue
            try:
                key, cache, info = prepare_document(store, job.document, report)
            except (TiercacheError, OSError) as exc:
                report.bad_lines.append((job.line, str(exc)))
                print(f"{jobs_path}:{job.line}: skipped: {exc}", file=sys.stderr)
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
    bar.close()
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
