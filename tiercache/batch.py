"""Offline batch jobs (CacheGen / LMCache style): encode each document's KV once, keep it
compressed on disk under a content key, and answer many questions from it in this or any later
process, loading the KV instead of recomputing the prefill.

- ``ContextStore``: ``encode(document) -> key`` (``content_key`` of the model id and the token
  ids; nothing is recomputed when the key is stored already), ``load(key) -> TieredCache``.
  Records live in a ``DiskStore`` (persistent index, checksums on every read, single writer);
  a JSON sidecar keeps what was measured at encode time (tokens, prefill seconds, bytes).
- ``run_batch``: a JSON-lines jobs file (``{"document": text | "path": file, "questions": [...]}``
  per line, with an optional ``"id"``) answered into a JSON-lines answers file, one line per
  answer, flushed and fsynced as it is written. Answers are keyed by job (its ``"id"``, else its
  line number) and question index, so a question asked twice is answered twice; a rerun skips the
  answers already written. A bad job line (not UTF-8, not JSON, not a job) is reported with its
  number and skipped, never fatal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import ATTN_NAME, TieredCache, default_config
from .config import RetrievalConfig, TierConfig
from .errors import BlockNotFoundError, ConfigError, ShapeError, StoreError, TiercacheError
from .io.codec import make_codec
from .io.contexts import content_key, load_kv_context, save_kv_context
from .io.store import DiskStore
from .stopping import DEFAULT_STOP
from .stream import ask_cache, attention_implementation, model_id, write_json_atomic

#: The sidecar of a context store: per context key, what encoding it measured.
SIDECAR_NAME = "contexts-meta.json"
#: Tokens per forward when encoding a document (bounds the score tensors of the prefill).
_PREFILL_CHUNK = 512
#: Tokens a default config leaves beyond a document for a question and its answer.
_ROOM_TOKENS = 512


@dataclass(frozen=True)
class ContextInfo:
    """What ``ContextStore.encode`` measured for one context: ``tokens``, ``prefill_seconds`` (the
    prefill it saves each later use), ``raw_bytes`` of KV and ``stored_bytes`` on disk."""

    key: str
    tokens: int
    prefill_seconds: float
    raw_bytes: int
    stored_bytes: int
    codec: str


def prefill(model, config: TierConfig, ids: list[int]) -> TieredCache:
    """A ``TieredCache`` holding ``ids`` prefilled with full attention, ``_PREFILL_CHUNK``
    tokens per forward (exact; the device never holds more than ``config``'s budget)."""
    cache = TieredCache(model, config, prefill="full")
    device = next(model.parameters()).device
    try:
        with attention_implementation(model, ATTN_NAME), torch.no_grad():
            for a in range(0, len(ids), _PREFILL_CHUNK):
                model(torch.tensor([ids[a : a + _PREFILL_CHUNK]], device=device), past_key_values=cache,
                      use_cache=True)
    except BaseException:
        cache.close()
        raise
    cache.prefill = "retrieval"
    return cache


class ContextStore:
    """Documents' KV caches on disk under content keys.

    ``path``: the store directory (created; one writer at a time). ``codec`` / ``codec_params``:
    the encoding of stored KV (``"cachegen"``, ``"quant"``, ``"zstd"`` (lossless), ``"raw"``).
    ``config``: the tiers a context is prefilled and loaded into (default: ``default_config``
    sized for the document plus ``_ROOM_TOKENS`` of question and answer; a disk tier, if any,
    must live elsewhere). ``retrieval``: the retrieval settings of that default config. ``budget_bytes``: disk bytes the store may hold; older
    contexts are evicted, least recently used first. ``max_tokens``: longest document accepted.
    """

    def __init__(self, path: str | os.PathLike, model, tokenizer, codec: str = "cachegen", *,
                 codec_params: dict | None = None, config: TierConfig | None = None,
                 retrieval: RetrievalConfig | None = None,
                 budget_bytes: int = 16 << 30, max_tokens: int = 32768) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        self.path = Path(path)
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id(model)
        self.codec_name = codec
        self.codec = make_codec(codec, **(codec_params or {}))
        self.config = config
        self.retrieval = retrieval
        self.max_tokens = max_tokens
        self.store = DiskStore(self.path, budget_bytes)
        self._info = self._read_sidecar()
        #: Contexts found already stored by ``encode`` / encoded anew, since this store opened.
        self.hits = 0
        self.misses = 0

    def tokens(self, document: str) -> list[int]:
        """Token ids of ``document``; ``ShapeError`` if empty or longer than ``max_tokens``."""
        if not isinstance(document, str) or not document.strip():
            raise ShapeError("the document is empty")
        ids = self.tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_tokens:
            raise ShapeError(f"the document has {len(ids)} tokens, more than max_tokens={self.max_tokens}")
        return ids

    def key(self, document: str) -> str:
        """The content key ``document`` is stored under (this model's id and its token ids)."""
        return content_key(self.model_id, self.tokens(document))

    def encode(self, document: str) -> str:
        """Store the KV of ``document`` (prefilled with full attention, in chunks) unless it is
        stored already; return its key."""
        ids = self.tokens(document)
        key = content_key(self.model_id, ids)
        if self.store.has_context(key):
            self.hits += 1
            return key
        self.misses += 1
        start = time.perf_counter()
        cache = prefill(self.model, self._config(len(ids)), ids)
        prefill_seconds = time.perf_counter() - start
        try:
            kv = cache.export_kv()
        finally:
            cache.close()
        stored = save_kv_context(self.store, key, kv, self.codec)
        self._info[key] = ContextInfo(key, len(ids), prefill_seconds, kv.numel() * kv.element_size(), stored,
                                      self.codec_name)
        self._write_sidecar()
        return key

    def load(self, key: str) -> TieredCache:
        """A fresh ``TieredCache`` holding context ``key`` (imported, no prefill); the caller
        closes it. ``BlockNotFoundError`` if the store does not hold ``key``."""
        kv = load_kv_context(self.store, key)
        cache = TieredCache(self.model, self._config(kv.shape[3]), prefill="retrieval")
        try:
            cache.import_kv(kv.to(cache.layout.dtype))
        except BaseException:
            cache.close()
            raise
        return cache

    def info(self, key: str) -> ContextInfo | None:
        """What was measured when ``key`` was encoded (None if not known to this store)."""
        return self._info.get(key)

    def close(self) -> None:
        """Release the store (and its writer lock)."""
        self.store.close()

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

    def _read_sidecar(self) -> dict[str, ContextInfo]:
        file = self.path / SIDECAR_NAME
        if not file.exists():
            return {}
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
            return {k: ContextInfo(**v) for k, v in doc["contexts"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Only measurements are lost: the contexts themselves live in the store.
            print(f"tiercache: ignoring unreadable {file}: {exc!r}", file=sys.stderr)
            return {}

    def _write_sidecar(self) -> None:
        live = {k: vars(v) for k, v in self._info.items() if self.store.has_context(k)}
        write_json_atomic(self.path / SIDECAR_NAME, {"format": "tiercache-contexts", "version": 1, "contexts": live})


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


def run_batch(jobs_path: str | os.PathLike, out_path: str | os.PathLike, store: ContextStore, *,
              max_new_tokens: int = 32, stop: str | Sequence[str] | None = DEFAULT_STOP,
              progress: bool = True, on_answer: Callable[[dict], None] | None = None) -> BatchReport:
    """Answer every question of ``jobs_path`` into ``out_path`` (JSON lines ``{"job", "index",
    "line", "question", "answer", "context"}``: the job's id, the question's index in it, the
    job's line), skipping those answered by an earlier run. Each document is encoded once into
    ``store``; its questions are answered from the loaded KV, one after the other (the cache is
    truncated back after each); answers end as ``stream.greedy_answer`` says (``max_new_tokens``,
    ``stop``). ``on_answer`` sees each record after it is durably written. Bad lines go to stderr
    and ``BatchReport.bad_lines``. ``ConfigError`` if ``out_path`` cannot be written."""
    from tqdm import tqdm

    out = check_answers_path(out_path)
    jobs, bad = read_jobs(jobs_path)
    done = _answered(out)
    report = BatchReport(bad_lines=bad)
    for number, reason in bad:
        print(f"{jobs_path}:{number}: skipped: {reason}", file=sys.stderr)
    pending = [(job, [(i, q) for i, q in enumerate(job.questions) if (job.id, i) not in done])
               for job in jobs]
    report.already_answered = sum(len(job.questions) - len(qs) for job, qs in pending)
    bar = tqdm(total=sum(len(qs) for _, qs in pending), unit="q", disable=not progress, desc="answering")
    try:
        sink = open(out, "a", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot open answers file {out}: {exc.strerror or exc}") from exc
    with sink:
        for job, questions in pending:
            if not questions:
                continue
            try:
                key, cache = _prepare(store, job, report)
            except (TiercacheError, OSError) as exc:
                report.bad_lines.append((job.line, str(exc)))
                print(f"{jobs_path}:{job.line}: skipped: {exc}", file=sys.stderr)
                bar.update(len(questions))
                continue
            try:
                for index, question in questions:
                    record = _answer(store, cache, job, key, index, question, max_new_tokens, stop, report)
                    sink.write(json.dumps(record) + "\n")
                    sink.flush()
                    os.fsync(sink.fileno())
                    bar.set_postfix(_postfix(store, report, cache), refresh=False)
                    bar.update(1)
                    if on_answer is not None:
                        on_answer(record)
            finally:
                stats = cache.manager.stats()
                report.block_lookups += stats.lookups
                report.device_hits += stats.hits["device"]
                cache.close()
    bar.close()
    report.saved_seconds -= report.prefill_seconds + report.load_seconds
    return report


def _prepare(store: ContextStore, job: Job, report: BatchReport) -> tuple[str, TieredCache]:
    """Encode (or find) the job's document and load its KV."""
    misses = store.misses
    key = store.encode(job.document)
    info = store.info(key)
    if store.misses > misses:
        report.encoded += 1
        report.prefill_seconds += info.prefill_seconds
    else:
        report.reused += 1
    start = time.perf_counter()
    try:
        cache = store.load(key)
    except BlockNotFoundError as exc:  # evicted between encode and load: a budget too small
        raise StoreError(f"context {key[:16]}... was evicted before use; raise the store's budget") from exc
    report.load_seconds += time.perf_counter() - start
    return key, cache


def _answer(store: ContextStore, cache: TieredCache, job: Job, key: str, index: int, question: str,
            max_new_tokens: int, stop: str | Sequence[str] | None, report: BatchReport) -> dict:
    start = time.perf_counter()
    answer = ask_cache(store.model, store.tokenizer, cache, question, max_new_tokens, stop)
    report.answer_seconds += time.perf_counter() - start
    report.answer_tokens += len(store.tokenizer(answer, add_special_tokens=False)["input_ids"])
    report.answered += 1
    info = store.info(key)
    if info is not None:
        report.saved_seconds += info.prefill_seconds
    return {"job": job.id, "index": index, "line": job.line, "question": question, "answer": answer,
            "context": key}


def _postfix(store: ContextStore, report: BatchReport, cache: TieredCache) -> dict[str, str]:
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
