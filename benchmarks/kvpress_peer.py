"""The peers of benchmarks/bench_quality.py: NVIDIA kvpress presses on the very cases tiercache runs.

Runs in its own virtual environment, since kvpress pins ``transformers < 5.3``:

    python3 -m venv benchmarks/.venv-kvpress
    benchmarks/.venv-kvpress/bin/pip install torch==2.13.0
    benchmarks/.venv-kvpress/bin/pip install "transformers>=4.56,<5.3" kvpress==0.5.5

``bench_quality.py`` writes the cases (token ids, so this script needs no tiercache) to a JSON spec
and calls ``kvpress_peer.py SPEC OUT``. Each press compresses the prompt to ``1 - budget`` of its
KV during prefill, as kvpress's own pipeline does (the context only; the question then attends
the compressed cache at its original positions), and decodes from the compressed cache:

- agreement: the whole prompt compressed, then teacher-forced through full attention's greedy
  continuation (full attention recomputed here, same model and inputs);
- needle and stream QA: the context compressed, then the question and a greedy answer; the
  query-aware FinchPress compresses context + delimiter + question together, as it requires.
"""

from __future__ import annotations

import json
import re
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from kvpress import ExpectedAttentionPress, FinchPress, SnapKVPress, StreamingLLMPress

PRESSES = {"kvpress StreamingLLM": StreamingLLMPress, "kvpress SnapKV": SnapKVPress,
           "kvpress ExpectedAttention": ExpectedAttentionPress, "kvpress Finch (query-aware)": FinchPress}


def key_of(text: str) -> str:
    found = re.search(r"\d{5}", text)
    return found.group(0) if found else ""


@torch.no_grad()
def prefill(model, ids: list[int], press=None):
    """Cache and last logits of ``ids``, compressed by ``press`` if given."""
    cache = DynamicCache()
    if press is None:
        out = model(torch.tensor([ids]), past_key_values=cache)
    else:
        with press(model):
            out = model(torch.tensor([ids]), past_key_values=cache)
    return cache, out.logits[0, -1]


@torch.no_grad()
def decode(model, cache, first, n, start, forced=None):
    """``n`` steps after ``first`` logits, tokens at positions from ``start``: greedy or fed
    ``forced``; returns the greedy tokens and the log-probabilities."""
    logps, tokens = [F.log_softmax(first.float(), -1)], [int(first.argmax())]
    for i in range(n - 1):
        feed = forced[i] if forced is not None else tokens[-1]
        out = model(torch.tensor([[feed]]), past_key_values=cache, position_ids=torch.tensor([[start + i]]))
        logps.append(F.log_softmax(out.logits[0, -1].float(), -1))
        tokens.append(int(logps[-1].argmax()))
    return tokens, logps


@torch.no_grad()
def answer(model, tok, context: list[int], question: list[int], press, n: int = 8) -> str:
    """kvpress's protocol: compress the context (query-aware Finch: context + delimiter +
    question), then the question at its original positions, then a greedy answer."""
    if isinstance(press, FinchPress):
        ids = context + [press.delimiter_token_id] + question
        cache, first = prefill(model, ids, press)
        start = len(ids)
    else:
        cache, _ = prefill(model, context, press)
        out = model(torch.tensor([question]), past_key_values=cache,
                    position_ids=torch.arange(len(context), len(context) + len(question))[None])
        first, start = out.logits[0, -1], len(context) + len(question)
    return tok.decode(decode(model, cache, first, n, start)[0])


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    torch.set_num_threads(spec.get("threads", 1))
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    # Full attention's side of every case, once.
    references = []
    for case in spec["agree"]:
        full_cache, first = prefill(model, case["ids"])
        references.append(decode(model, full_cache, first, case["new_tokens"], len(case["ids"])))
    full_keys = [key_of(answer(model, tok, c["context"], c["question"], None)) for c in spec["needle"]]
    full_ok = [expected in answer(model, tok, s["ids"], q, None, 6)
               for s in spec["qa"] for q, expected in zip(s["questions"], s["answers"])]
    rows = []
    for name, cls in PRESSES.items():
        for b in spec["budgets"]:
            press = cls(compression_ratio=1 - b)
            if isinstance(press, FinchPress):
                press.update_model_and_tokenizer(model, tok)
            else:  # query-aware Finch needs a question, which a continuation has not
                for case, (reference, ref_logps) in zip(spec["agree"], references):
                    ids, n = case["ids"], case["new_tokens"]
                    cache, first = prefill(model, ids, press)
                    chosen, logps = decode(model, cache, first, n, len(ids), forced=reference)
                    kl = torch.stack([F.kl_div(lp, r, log_target=True, reduction="sum")
                                      for lp, r in zip(logps, ref_logps)])
                    rows.append({"case": "agreement", "method": name, "budget": b, "tokens": len(ids),
                                 "agreement": sum(c == t for c, t in zip(chosen, reference)) / n,
                                 "kl": float(kl.mean())})
                    print(rows[-1], flush=True)
            by_length: dict[int, list[bool]] = {}
            for case, full in zip(spec["needle"], full_keys):
                got = key_of(answer(model, tok, case["context"], case["question"], press))
                by_length.setdefault(case["length"], []).append(got == full)
            for length, agree in by_length.items():
                rows.append({"case": "needle", "method": name, "budget": b, "tokens": length,
                             "agreement": sum(agree) / len(agree)})
                print(rows[-1], flush=True)
            if spec["qa"]:
                ok = [expected in answer(model, tok, s["ids"], q, press, 6)
                      for s in spec["qa"] for q, expected in zip(s["questions"], s["answers"])]
                both = sum(o and f for o, f in zip(ok, full_ok))
                rows.append({"case": "stream_qa", "method": name, "budget": b, "tokens": len(spec["qa"][0]["ids"]),
                             "agreement": both / max(1, sum(full_ok)), "correct": sum(ok),
                             "full_correct": sum(full_ok)})
                print(rows[-1], flush=True)
    json.dump(rows, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
