"""``tiercache demo``: a streaming QA session on a model (default: the embedded SmolLM2) against
full attention over the same text."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from ..evaluation import FACTS, plant_facts, question_text
from .inspect import TIERS_DIR, holds_store
from .options import answer_options, budget, compression, describe_budget, positive, say


def register(commands, model_options: argparse.ArgumentParser) -> None:
    """Add the ``demo`` command to ``commands`` (argparse subparsers)."""
    demo = commands.add_parser("demo", help="streaming QA on a model (default: the embedded SmolLM2) vs full "
                               "attention", description=run.__doc__,
                               parents=[model_options, answer_options(12)])
    demo.add_argument("--tokens", type=positive, default=1500, help="stream length in tokens (default 1500)")
    demo.add_argument("--chunk-tokens", type=positive, default=128,
                      help="tokens per appended chunk (default 128)")
    demo.add_argument("--budget", type=budget, default=0.5,
                      help="retrieval budget each question step attends: a fraction of the stream (0.5) or a "
                           "number of tokens (512) (default 0.5)")
    demo.add_argument("--store", type=Path, default=None,
                      help="directory of the saved stream, and of the tiers' disk while the demo runs "
                           "(default $TIERCACHE_HOME/demo; an earlier demo's store there is replaced)")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Stream real text with planted facts through a StreamSession (small budgets: the device
    holds 1/8 of the KV, the host 1/4, the rest goes to disk with the cachegen codec), ask about
    the facts, compare with full attention over the same text, and save the stream to --store
    for `tiercache inspect`."""
    from tqdm import tqdm

    from ..config import RetrievalConfig, TierConfig
    from ..corpus import text_tokens
    from ..generation import full_attention_answers
    from ..spec import kv_bytes_per_token
    from ..stream import StreamSession
    from .options import load

    store = _demo_store(args.store)
    model, tok = load(args)
    ids = plant_facts(tok, text_tokens(tok, args.tokens, offset_tokens=1000))
    per_token = kv_bytes_per_token(model)
    kv_bytes = per_token * len(ids)
    device = next(model.parameters()).device
    tiers = store / TIERS_DIR
    # The host takes a whole appended chunk before any of it moves to disk, and each layer's open
    # block beside a device's worth of blocks (token retrieval keeps open blocks there): a short
    # stream's quarter may hold less (a tiny model's 200-token stream).
    device_bytes = max(kv_bytes // 8, per_token * 128)
    block = TierConfig.__dataclass_fields__["block_tokens"].default
    host = max(kv_bytes // 4, 2 * per_token * args.chunk_tokens, device_bytes + per_token * block)
    cfg = TierConfig(device_budget_bytes=device_bytes, host_budget_bytes=host,
                     disk_budget_bytes=4 * kv_bytes, disk_path=tiers, disk_codec="cachegen",
                     dtype=model.dtype, device=device, retrieval=RetrievalConfig(budget=args.budget))
    say(f"stream: {len(ids)} tokens of Python's reference docs with {len(FACTS)} facts planted; KV "
        f"{kv_bytes / 2**20:.1f} MiB; device budget {cfg.device_budget_bytes / 2**20:.1f} MiB, host "
        f"{cfg.host_budget_bytes / 2**20:.1f} MiB, disk the rest (cachegen, in {tiers}); questions attend "
        f"{describe_budget(args.budget)} of the stream")
    questions = [question_text(f) for f in FACTS]
    shutil.rmtree(tiers, ignore_errors=True)  # an interrupted demo's
    with StreamSession(model, tok, cfg, path=store, chunk_tokens=args.chunk_tokens) as session:
        start = time.perf_counter()
        with tqdm(total=len(ids), desc="appending", unit="tok") as bar:
            for a in range(0, len(ids), args.chunk_tokens):
                session.append(ids[a : a + args.chunk_tokens])
                bar.update(min(args.chunk_tokens, len(ids) - a))
        append_s = time.perf_counter() - start
        before = session.cache.manager.stats()
        start = time.perf_counter()
        with tqdm(questions, desc="asking tiercache", unit="q") as bar:  # closed before a Ctrl-C's message
            got = [session.ask(q, max_new_tokens=args.max_new_tokens, stop=args.stop) for q in bar]
        ask_s = time.perf_counter() - start
        ref = full_attention_answers(model, tok, questions, input_ids=ids, max_new_tokens=args.max_new_tokens,
                                     stop=args.stop, progress=True)
        print(flush=True)
        _print_answers(list(zip(FACTS, got, ref)), args.budget)
        _print_tiers(session, before, append_s, ask_s, len(ids), args.max_new_tokens)
        saved = session.save()
    shutil.rmtree(tiers)
    print(f"\nthe stream is saved in {store} ({saved / 2**20:.1f} MiB with the cachegen codec); see what it "
          f"holds with:\n  tiercache inspect {store}")
    return 0


def _demo_store(path: Path | None) -> Path:
    """The demo's store directory: ``path`` or ``$TIERCACHE_HOME/demo``. It must be new, empty or
    a tiercache store (an earlier demo's, which the run replaces), never other files."""
    from ..errors import ConfigError
    from ..paths import cache_home

    store = Path(path) if path is not None else cache_home() / "demo"
    if store.exists() and not store.is_dir():
        raise ConfigError(f"--store {store} exists and is not a directory")
    if store.is_dir() and any(store.iterdir()) and not holds_store(store):
        raise ConfigError(f"--store {store} is not empty and holds no tiercache store; give a new or empty "
                          "directory")
    return store


#: Column widths of the demo's answer table (characters); answers wrap within them.
_COLUMNS = (("question", 34), ("expected", 9), ("tiercache", 24), ("full attention", 24))


def _print_answers(rows, budget: float | int) -> None:
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
    say(f"legend: ok = the answer contains the expected word, -- = it does not. tiercache answers from "
        f"its tiers, each step attending {describe_budget(budget)} of the stream (the blocks retrieval "
        f"picks); full attention reads every token (the reference).")
    print()


def _print_tiers(session, before, append_s: float, ask_s: float, tokens: int, new_tokens: int) -> None:
    from ..blocks import TierName

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
        say(f"disk codec {session.config.disk_codec}: {raw / 2**20:.1f} MiB of raw KV in "
            f"{disk.used_bytes / 2**20:.1f} MiB on disk, compression {compression(raw, disk.used_bytes)}")
    lookups = stats.lookups - before.lookups
    hits = stats.hits["device"] - before.hits["device"]
    say(f"retrieval while asking: {lookups} block reads, device hit rate {hits / max(1, lookups):.2f}, "
        f"{stats.disk_waits - before.disk_waits} waits for the disk")
    say(f"throughput: append {tokens / append_s:.0f} tokens/s; asking {ask_s:.1f} s for {len(FACTS)} "
        f"questions (up to {new_tokens} new tokens each)")
