"""Needle in a haystack and greedy agreement on SmolLM2-135M-Instruct: tiercache vs full attention.

Haystack: real English prose (Python's reference docs) of 2K, 4K and 8K tokens; needle: a pass-key
sentence with a random 5-digit key, at 10 depths. Full attention (sdpa) and TieredCache (device
budget 25% of the KV, retrieval budget 10% of the tokens) each answer greedily; a case counts as
correct when the key appears in the answer. Target: tiercache answers as full attention does in
>= 95% of the cases. Also: greedy generation of N tokens after a 4K-token prompt, tokens that agree
with full attention, two ways: free-running (each cache generates its own continuation, so one
flipped near-tie changes everything after it) and teacher-forced (tiercache is fed full attention's
continuation and its greedy choice is compared at every step: the share of steps where sparse
decoding picks the same next token).

    python benchmarks/bench_needle.py [--lengths 2048,4096,8192] [--depths 10] [--agree-tokens 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import machine, parse_args, print_table, write_results
from tiercache import RetrievalConfig, TierConfig
from tiercache.cache import TieredCache
from tiercache.corpus import text_tokens
from tiercache.models import load_default_model


def tiered_config(model, tokens: int, args: argparse.Namespace) -> TierConfig:
    c = model.config
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4 * tokens
    overrides = {"sink_tokens": args.sink, "window_tokens": args.window, "summary": args.summary}
    retrieval = RetrievalConfig(budget=args.budget, **{k: v for k, v in overrides.items() if v is not None})
    block = {"block_tokens": args.block} if args.block else {}
    return TierConfig(device_budget_bytes=kv // 4, host_budget_bytes=2 * kv, dtype=torch.float32,
                      retrieval=retrieval, **block)


@torch.no_grad()
def generate(model, ids: torch.Tensor, cache, new_tokens: int) -> list[int]:
    if cache is None:
        model.set_attn_implementation("sdpa")
    out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False)
    model.set_attn_implementation("sdpa")
    if cache is not None:
        cache.close()
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def forced_agreement(model, ids: torch.Tensor, cache, reference: list[int]) -> float:
    """Share of steps at which ``cache``'s greedy choice equals ``reference`` when it is fed
    ``reference`` itself (the prompt's last logits predict ``reference[0]``)."""
    out = model(ids, past_key_values=cache, use_cache=True)
    same = 0
    for i, want in enumerate(reference):
        same += int(out.logits[0, -1].argmax()) == want
        if i + 1 < len(reference):
            out = model(torch.tensor([[want]]), past_key_values=cache, use_cache=True)
    model.set_attn_implementation("sdpa")
    cache.close()
    return same / len(reference)


def needle_parts(tok, length: int, depth: float, seed: int) -> tuple[list[int], list[int], str]:
    """A haystack of real prose with a pass-key sentence at ``depth`` (0 to 1), and the question:
    ``(context ids, question ids, key)``, ``length`` tokens in all."""
    g = torch.Generator().manual_seed(seed)
    key = "".join(str(d) for d in torch.randint(0, 10, (5,), generator=g).tolist())
    needle = tok(f"\nThe secret pass key is {key}. Remember it.\n", add_special_tokens=False)["input_ids"]
    question = tok("\nWhat is the secret pass key? The secret pass key is", add_special_tokens=False)["input_ids"]
    hay = text_tokens(tok, length - len(needle) - len(question), offset_tokens=2000 + 997 * (seed % 97))
    at = int(depth * len(hay))
    return hay[:at] + needle + hay[at:], question, key


def needle_case(tok, length: int, depth: float, seed: int) -> tuple[torch.Tensor, str]:
    context, question, key = needle_parts(tok, length, depth, seed)
    return torch.tensor([context + question]), key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--depths", type=int, default=10)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--summary", default=None, help="block summary (default: RetrievalConfig's)")
    ap.add_argument("--block", type=int, default=None, help="tokens per block (default: TierConfig's)")
    ap.add_argument("--sink", type=int, default=None, help="sink tokens (default: RetrievalConfig's)")
    ap.add_argument("--window", type=int, default=None, help="recent-window tokens (default: RetrievalConfig's)")
    ap.add_argument("--agree-tokens", type=int, default=128)
    ap.add_argument("--agree-prompt", type=int, default=4096)
    args = parse_args(ap)
    model, tok = load_default_model()
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for d in range(args.depths):
            depth = (d + 0.5) / args.depths
            ids, key = needle_case(tok, length, depth, seed=length + d)
            t = time.perf_counter()
            full = tok.decode(generate(model, ids, None, 8))
            t_full = time.perf_counter() - t
            t = time.perf_counter()
            tiered = tok.decode(generate(model, ids, TieredCache(model, tiered_config(model, length, args)), 8))
            t_tiered = time.perf_counter() - t
            row = {"length": length, "depth": round(depth, 2), "key": key, "full_ok": key in full,
                   "tiered_ok": key in tiered, "same": (key in full) == (key in tiered),
                   "full_s": t_full, "tiered_s": t_tiered}
            rows.append(row)
            print(row, flush=True)
    summary = []
    for length in sorted({r["length"] for r in rows}):
        rs = [r for r in rows if r["length"] == length]
        summary.append({"length": length, "cases": len(rs), "full_acc": sum(r["full_ok"] for r in rs) / len(rs),
                        "tiered_acc": sum(r["tiered_ok"] for r in rs) / len(rs),
                        "same_as_full": sum(r["same"] for r in rs) / len(rs)})
    same_all = sum(r["same"] for r in rows) / len(rows)

    agree = {}
    if args.agree_tokens:
        ids = torch.tensor([text_tokens(tok, args.agree_prompt, offset_tokens=40000)])
        ref = generate(model, ids, None, args.agree_tokens)
        got = generate(model, ids, TieredCache(model, tiered_config(model, args.agree_prompt + args.agree_tokens, args)), args.agree_tokens)
        first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
        forced_cfg = tiered_config(model, args.agree_prompt + args.agree_tokens, args)
        agree = {"prompt_tokens": args.agree_prompt, "generated": len(ref),
                 "agreement": sum(a == b for a, b in zip(ref, got)) / len(ref), "first_divergence": first,
                 "forced_agreement": forced_agreement(model, ids, TieredCache(model, forced_cfg), ref)}

    print(f"\nneedle in a haystack on {machine()['device']}: device budget 25% of the KV, retrieval {args.budget:.0%}")
    print_table(summary)
    print(f"tiercache answers as full attention in {same_all:.1%} of {len(rows)} cases (target >= 95%)")
    if agree:
        print(f"greedy agreement after a {agree['prompt_tokens']}-token prompt: {agree['agreement']:.1%} of "
              f"{agree['generated']} tokens, first divergence at token {agree['first_divergence']}; "
              f"teacher-forced: {agree['forced_agreement']:.1%} of steps pick full attention's token")
    write_results("bench_needle", rows, summary=summary, same_as_full=same_all, agreement=agree,
                  settings=vars(args))


if __name__ == "__main__":
    main()
