"""Does a read budget answer as full attention does? tiercache and its peers, in one run.

SmolLM2-135M-Instruct, fp32 on the CPU, real prose (Python's reference docs). At read budgets of
5%, 10% and 25% of the cached tokens:

1. **Agreement** (``--agree``): after a prompt of 2K / 4K / 8K tokens, full attention generates
   ``--agree-tokens`` greedy tokens; each method is fed that continuation (teacher forcing) and
   scored by the share of steps whose greedy choice is full attention's, and by the mean KL
   divergence ``KL(full || method)`` of the next-token distributions (nats).
2. **Needle** (``--needle``): a 5-digit pass key at ``--depths`` depths of a 1K / 2K / 4K / 8K
   haystack, then the question; agreement = the method's answer carries the same key as full
   attention's (both none counts too).
3. **Stream QA** (``--qa``): two streams of about 4.2K tokens (different parts of the text) with 7 planted
   facts each, encoded chunk by chunk (tiercache's stream encoding: sink + window per chunk), asked
   after the whole stream; scored over the facts full attention answers.

Methods, on the same cases:
- ``tiercache``: the library's defaults (``RetrievalConfig``) at the budget; the prompt is prefilled
  exactly (its KV imported from full attention's cache: the same numbers a full prefill makes),
  then every decode step reads the budget;
- the peers of ``kvpress_peer.py`` (NVIDIA kvpress: StreamingLLM, SnapKV, ExpectedAttention, and the
  query-aware presses it ships) at a compression ratio of ``1 - budget``, run in their own virtual
  environment (kvpress pins ``transformers < 5.3``; ``--kvpress-python``); skipped with a note when
  that environment is missing.

    OMP_NUM_THREADS=1 python benchmarks/bench_quality.py [--quick] [--agree] [--needle] [--qa]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from common import dense_kv, machine, parse_args, print_table, qa_streams, write_results
from tiercache import RetrievalConfig, TierConfig
from tiercache.hf.cache import TieredCache
from tiercache.corpus import text_tokens
from tiercache.evaluation import needle_parts, question_text
from tiercache.models import default_model_dir, load_default_model
from tiercache.spec import kv_bytes_per_token
from tiercache.generation import full_attention_answers
from tiercache.stream import StreamSession

BUDGETS = (0.05, 0.1, 0.25)
KVPRESS_PYTHON = Path(__file__).parent / ".venv-kvpress" / "bin" / "python"


def tiered(model, tokens: int, budget: float, base: RetrievalConfig) -> TierConfig:
    """``base`` (the library's defaults unless a flag changes them) at ``budget``, tiers sized for
    ``tokens`` (the device 25% of the KV)."""
    total = kv_bytes_per_token(model) * tokens
    return TierConfig(device_budget_bytes=max(total // 4, kv_bytes_per_token(model) * 256), host_budget_bytes=2 * total,
                      dtype=model.dtype, device="cpu", retrieval=replace(base, budget=budget))


@torch.no_grad()
def full_prefill(model, ids: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Full attention's cache of ``ids`` and its last logits."""
    cache = DynamicCache(config=model.config)
    out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
    return cache, out.logits[0, -1]


@torch.no_grad()
def decode(model, cache, first: torch.Tensor, n: int, forced: list[int] | None = None):
    """``n`` steps after the prompt's last logits ``first``: greedy, or fed ``forced`` (teacher
    forcing). Returns the tokens chosen greedily at each step and the next-token log-probabilities."""
    logps = [F.log_softmax(first.float(), -1)]
    tokens = [int(first.argmax())]
    for i in range(n - 1):
        feed = forced[i] if forced is not None else tokens[-1]
        out = model(torch.tensor([[feed]]), past_key_values=cache, use_cache=True)
        logps.append(F.log_softmax(out.logits[0, -1].float(), -1))
        tokens.append(int(logps[-1].argmax()))
    return tokens, logps


def key_of(text: str) -> str:
    found = re.search(r"\d{5}", text)
    return found.group(0) if found else ""


def agreement_cases(tok, contexts: list[int]) -> list[list[int]]:
    return [text_tokens(tok, n, offset_tokens=5000 + n) for n in contexts]


def needle_cases(tok, lengths: list[int], depths: int) -> list[tuple[list[int], list[int], int]]:
    """(context, question, length) of every needle case."""
    out = []
    for length in lengths:
        for d in range(depths):
            context, question, _ = needle_parts(tok, length, (d + 0.5) / depths, seed=length + d)
            out.append((context, question, length))
    return out


def agreement(model, tok, contexts: list[int], n_tokens: int, base: RetrievalConfig,
              budgets: tuple[float, ...]) -> list[dict]:
    rows = []
    for ids in agreement_cases(tok, contexts):
        n = len(ids)
        ref_cache, first = full_prefill(model, ids)
        kv = dense_kv(ref_cache)
        reference, ref_logps = decode(model, ref_cache, first, n_tokens)
        for b in budgets:
            cache = TieredCache(model, tiered(model, n + n_tokens, b, base))
            cache.import_kv(kv)
            chosen, logps = decode(model, cache, first, n_tokens, forced=reference)
            cache.close()
            kl = torch.stack([F.kl_div(lp, r, log_target=True, reduction="sum") for lp, r in zip(logps, ref_logps)])
            rows.append({"case": "agreement", "method": "tiercache", "budget": b, "tokens": n,
                         "agreement": sum(c == t for c, t in zip(chosen, reference)) / n_tokens,
                         "kl": float(kl.mean()), "read": cache.attended_fraction})
            print(rows[-1], flush=True)
    return rows


def needle(model, tok, lengths: list[int], depths: int, base: RetrievalConfig,
           budgets: tuple[float, ...]) -> list[dict]:
    agree = {(length, b): 0 for length in lengths for b in budgets}
    full_found = dict.fromkeys(lengths, 0)
    for context, question, length in needle_cases(tok, lengths, depths):
        ids = context + question
        ref_cache, first = full_prefill(model, ids)
        kv = dense_kv(ref_cache)
        full = key_of(tok.decode(decode(model, ref_cache, first, 8)[0]))
        full_found[length] += full != ""
        for b in budgets:
            cache = TieredCache(model, tiered(model, len(ids) + 8, b, base))
            cache.import_kv(kv)
            agree[(length, b)] += key_of(tok.decode(decode(model, cache, first, 8)[0])) == full
            cache.close()
    rows = []
    for (length, b), n in agree.items():
        rows.append({"case": "needle", "method": "tiercache", "budget": b, "tokens": length,
                     "agreement": n / depths, "full_correct": full_found[length] / depths})
        print(rows[-1], flush=True)
    return rows


def stream_qa(model, tok, base: RetrievalConfig, budgets: tuple[float, ...], chunk: int = 128) -> list[dict]:
    ok = {b: [] for b in budgets}
    full_ok = []
    for ids, facts in qa_streams(tok):
        questions = [question_text(f) for f in facts]
        full_ok += [f.answer in a for f, a in zip(facts, full_attention_answers(model, tok, questions, input_ids=ids,
                                                                                max_new_tokens=6))]
        with tempfile.TemporaryDirectory() as tmp:
            for b in budgets:
                config = tiered(model, len(ids) + 64, b, base)
                with StreamSession(model, tok, config, path=tmp, chunk_tokens=chunk) as s:
                    for a in range(0, len(ids), chunk):
                        s.append(ids[a : a + chunk])
                    ok[b] += [f.answer in s.ask(q, max_new_tokens=6) for f, q in zip(facts, questions)]
    rows = []
    for b in budgets:
        both = sum(o and f for o, f in zip(ok[b], full_ok))
        rows.append({"case": "stream_qa", "method": "tiercache", "budget": b, "tokens": len(qa_streams(tok)[0][0]),
                     "agreement": both / max(1, sum(full_ok)), "correct": sum(ok[b]), "full_correct": sum(full_ok)})
        print(rows[-1], flush=True)
    return rows


def peers(args, spec: dict) -> list[dict]:
    """The kvpress peers on the same cases, in their own environment (or a note why not)."""
    python = Path(args.kvpress_python)
    if not python.exists():
        print(f"kvpress peers skipped: no {python} (see kvpress_peer.py for how to make it)", flush=True)
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    out = Path(f.name).with_suffix(".out.json")
    subprocess.run([str(python), str(Path(__file__).parent / "kvpress_peer.py"), f.name, str(out)], check=True)
    return json.loads(out.read_text())


def field_value(text: str) -> tuple[str, object]:
    """``"name=value"`` -> ``(name, value)``, the value an int, a float or a string."""
    name, _, value = text.partition("=")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2K agreement over 64 tokens, needle at 1K/2K x 4 depths")
    ap.add_argument("--agree", action="store_true")
    ap.add_argument("--needle", action="store_true")
    ap.add_argument("--qa", action="store_true")
    ap.add_argument("--agree-tokens", type=int, default=256)
    ap.add_argument("--depths", type=int, default=10)
    ap.add_argument("--kvpress-python", default=str(KVPRESS_PYTHON))
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma-separated read budgets")
    ap.add_argument("--retrieval", default="",
                    help="tiercache's RetrievalConfig fields changed from the library's defaults, e.g. "
                         "'unit_tokens=4,gqa_aggregate=softmax'")
    ap.add_argument("--out", default="bench_quality")
    args = parse_args(ap)
    if not (args.agree or args.needle or args.qa):
        args.agree = args.needle = args.qa = True
    model, tok = load_default_model()
    contexts = [2048] if args.quick else [2048, 4096, 8192]
    lengths = [1024, 2048] if args.quick else [1024, 2048, 4096, 8192]
    depths = 4 if args.quick else args.depths
    n_tokens = 64 if args.quick else args.agree_tokens
    base = RetrievalConfig(**dict(field_value(kv) for kv in args.retrieval.split(",") if kv))
    budgets = tuple(float(b) for b in args.budgets.split(","))
    start = time.perf_counter()
    rows = []
    if args.agree:
        rows += agreement(model, tok, contexts, n_tokens, base, budgets)
    if args.needle:
        rows += needle(model, tok, lengths, depths, base, budgets)
    if args.qa:
        rows += stream_qa(model, tok, base, budgets)
    if not args.no_peers:
        question = lambda q: tok(q, add_special_tokens=False)["input_ids"]  # noqa: E731
        spec = {"model": str(default_model_dir()), "budgets": budgets, "threads": args.threads,
                "agree": [{"ids": ids, "new_tokens": n_tokens} for ids in agreement_cases(tok, contexts)]
                if args.agree else [],
                "needle": [{"context": c, "question": q, "length": n} for c, q, n in needle_cases(tok, lengths, depths)]
                if args.needle else [],
                "qa": [{"ids": ids, "questions": [question(question_text(f)) for f in facts],
                        "answers": [f.answer for f in facts]} for ids, facts in qa_streams(tok)] if args.qa else []}
        rows += peers(args, spec)
    print(f"\nquality at read budgets, SmolLM2-135M, on {machine()['device']}, {time.perf_counter() - start:.0f} s")
    print_table(rows, ["case", "method", "budget", "tokens", "agreement", "kl", "read", "correct", "full_correct"])
    write_results(args.out, rows, budgets=budgets, retrieval=asdict(base))


if __name__ == "__main__":
    main()
