"""Streaming QA accuracy on SmolLM2-135M-Instruct: facts planted early in a long real-text stream,
asked after the whole stream has been appended, answered by (a) full attention over the same
text, (b) a tiercache StreamSession whose questions attend the whole stream (budget 1.0), and
(c) the same session at partial retrieval budgets.

The stream is Python's reference docs with ``--facts`` facts of one kind planted evenly from 5%
to 60% of its depth ("The secret code of the blue door is 4821."), asked as "What is the secret
code of the blue door? The secret code of the blue door is" -> "4821". The session encodes the
stream chunk by chunk with window attention (sink + recent window, flat cost per chunk), so its
KV differs from full attention's; (b) measures what that encoding costs, (c) what retrieval
costs on top. The session's device budget is 1/8 of the stream's KV, the host holds the rest (raw;
the disk tier's lossless codecs would give the same answers, only slower on this CPU).

Accuracy is reported over all facts and over the facts full attention answers (the denominator
a long-context method can be expected to reach on this model).

    python benchmarks/bench_stream_qa.py [--tokens 4096] [--facts 12] [--budgets 1.0 0.25 0.1]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import parse_args, print_table, write_results
from tiercache import RetrievalConfig, TierConfig
from tiercache.cli import QA_FACTS, plant_facts, question_text
from tiercache.corpus import text_tokens
from tiercache.models import load_default_model
from tiercache.cache import ATTN_NAME
from tiercache.stream import (StreamSession, attention_implementation, full_attention_answers, greedy_answer,
                              question_ids)


def ask(session: StreamSession, question: str, new_tokens: int, decode: str) -> str:
    """``session.ask`` with the answer's decode steps keeping the question's selection ("keep") or
    retrieving anew ("retrieve"); "fullq" reads the question with full attention over the whole
    stream (every block through the device: a diagnosis of what the question's retrieval loses,
    not a mode for long streams) and retrieves at each decode step."""
    if decode != "fullq":
        return session.ask(question, max_new_tokens=new_tokens, hold=decode == "keep")
    cache, n = session.cache, session.tokens
    cache.prefill = "full"
    try:
        with attention_implementation(session.model, ATTN_NAME):
            return greedy_answer(session.model, session.tokenizer, cache, question_ids(session.tokenizer, question),
                                 new_tokens)
    finally:
        cache.truncate(n)
        cache.prefill = "window"


def session_config(model, tokens: int, path: str, budget: float, block: int) -> TierConfig:
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    kv = per_token * tokens
    return TierConfig(device_budget_bytes=max(kv // 8, per_token * 4 * block), host_budget_bytes=2 * kv,
                      block_tokens=block, dtype=torch.float32, device="cpu", retrieval=RetrievalConfig(budget=budget))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="text per stream in tokens, before planting (default 4096)")
    parser.add_argument("--streams", type=int, default=2,
                        help="streams (different text), each with every n-th of the 14 facts (default 2)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.25, 0.1],
                        help="retrieval budgets, fractions of the stream (default 1.0 0.25 0.1)")
    parser.add_argument("--chunk", type=int, default=128, help="tokens per appended chunk (default 128)")
    parser.add_argument("--block", type=int, default=32, help="tokens per storage block (default 32)")
    parser.add_argument("--new-tokens", type=int, default=6, help="most tokens per answer (default 6)")
    parser.add_argument("--decode", nargs="+", default=["keep", "retrieve"], choices=["keep", "retrieve", "fullq"],
                        help="answer decode steps: keep the question's selection, or retrieve at every step; "
                             "fullq: the question read with full attention (diagnosis)")
    args = parse_args(parser)

    model, tok = load_default_model()
    variants = [(1.0, args.decode[0])] + [(b, d) for b in args.budgets if b < 1.0 for d in args.decode]
    results: dict[str, list[bool]] = {"full attention": []}
    answers: list[dict] = []
    for stream in range(args.streams):
        facts = QA_FACTS[stream :: args.streams]
        ids = plant_facts(tok, text_tokens(tok, args.tokens, offset_tokens=1000 + 12000 * stream), facts,
                          first=0.05, last=0.6)
        questions = [question_text(f) for f in facts]
        start = time.perf_counter()
        full = full_attention_answers(model, tok, questions, input_ids=ids, max_new_tokens=args.new_tokens)
        print(f"stream {stream}: {len(ids)} tokens, {len(facts)} facts; full attention "
              f"{sum(f.answer in a for f, a in zip(facts, full))}/{len(facts)} in {time.perf_counter() - start:.0f} s",
              flush=True)
        got = {"full attention": full}
        with tempfile.TemporaryDirectory() as tmp:
            cfg = session_config(model, len(ids), f"{tmp}/encode", 1.0, args.block)
            start = time.perf_counter()
            with StreamSession(model, tok, cfg, chunk_tokens=args.chunk) as session:
                for a in range(0, len(ids), args.chunk):
                    session.append(ids[a : a + args.chunk])
                kv = session.cache.export_kv()
            print(f"stream {stream} appended in {time.perf_counter() - start:.0f} s", flush=True)
            for budget, decode in variants:
                name = f"tiercache {budget:g} {decode}"
                cfg = session_config(model, len(ids), f"{tmp}/{budget}-{decode}", budget, args.block)
                with StreamSession(model, tok, cfg, chunk_tokens=args.chunk) as session:
                    session.cache.import_kv(kv)
                    got[name] = [ask(session, q, args.new_tokens, decode) for q in questions]
                print(f"  {name}: {sum(f.answer in a for f, a in zip(facts, got[name]))}/{len(facts)}", flush=True)
        for name, replies in got.items():
            results.setdefault(name, []).extend(f.answer in a for f, a in zip(facts, replies))
        answers += [{"stream": stream, "answer": f.answer, **{k: v[i] for k, v in got.items()}}
                    for i, f in enumerate(facts)]

    full_ok = results["full attention"]
    rows = []
    for name, ok in results.items():
        both = sum(o and r for o, r in zip(ok, full_ok))
        rows.append({"method": name, "correct": sum(ok), "of_facts": len(ok), "accuracy": sum(ok) / len(ok),
                     "correct_where_full_ok": both, "of_full_ok": sum(full_ok),
                     "accuracy_where_full_ok": both / max(1, sum(full_ok))})
    print_table(rows)
    print_table(answers)
    write_results("bench_stream_qa", rows, tokens=args.tokens, streams=args.streams, block=args.block,
                  chunk=args.chunk, answers=answers)


if __name__ == "__main__":
    main()
