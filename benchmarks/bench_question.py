"""Which blocks should a question read? Selections for a multi-token query at an equal read.

A question prefilled against a long context (a stream's ``ask``: cache prefill mode
``"retrieval"``) attends the context through one selection of blocks per layer, plus its own
tokens exactly. SmolLM2-135M-Instruct, the two streams of ``bench_quality.py --qa`` (``common.qa_streams``) (about 4.2K
tokens of prose, 7 planted facts each) and each fact's question: the post-RoPE queries of every
question position at every layer, and the context's keys. At a read budget of 10% and 25% of the
context (``Selector.plan``: sink 8 + window 32 tokens included, whole 8-token blocks, rounded down),
each selection is scored by

- ``recall``: the share of the attention full attention gives the *context* that falls in the
  blocks read, per question position and query head, averaged (``recall_last``: the last
  position alone, the one whose next token starts the answer);
- ``fact``: the same for the attention on the planted fact's tokens (the statement the question
  asks about), pooled over layers, heads and positions (so the heads that look at the fact weigh
  most), averaged over questions; ``fact_last``: the last position alone;
- ``union``: the share of the context whose blocks the prefill reads in all (a selection per
  position reads the union of its sets in one pass); ``read``: what one position attends.

Selections (every one reads ``plan.read`` blocks per position):

- ``joint vote``: today's ``Selector.select`` over all positions at once (GQA max over heads and
  positions, rank vote per KV head);
- ``last position``: the last position's own selection, for every position;
- ``per position``: each position its own ``select`` (a different set per position);
- ``joint vote W=8``: the same over the last 8 positions only;
- ``votes summed``: each position's rank votes (``Selector.votes``), summed over positions (a Borda
  count), the top ``read``;
- ``union trimmed``: the union of the per-position vote rankings, blocks ranked by their best rank
  over positions (then by summed votes), the top ``read``;
- ``snapkv W``: SnapKV's observation window: each head's softmax over the unit scores of the last
  ``W`` positions, summed over the group and the window, then the rank vote;
- ``summary attention``: every position and head attends the summaries of all complete blocks
  (softmax over the Quest bounds, sink and window included), the mass summed over positions and
  heads per block, the top blocks; ``estimate attention``: the same over the estimate's mean keys
  with ``log(count)`` (RetroInfer's centroids);
- diagnostics of the summary, not of the question's aggregation: the joint vote over Quest bounds
  of 4-token units (two per block), over 2 or 4 landmark keys per block, and over each block's
  exact maximum logit (8 landmarks: every key, so not a candidate), to tell the aggregation's
  loss from the summary's;
- ``oracle``: the blocks with the most true mass summed over positions and heads (one shared set:
  no shared selection does better).

    OMP_NUM_THREADS=1 python benchmarks/bench_question.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from transformers import DynamicCache

from common import machine, parse_args, print_table, qa_streams, write_results
from tiercache.evaluation import question_text
from tiercache.config import RetrievalConfig
from tiercache.models import load_default_model
from tiercache.retrieval.selector import Selector
from tiercache.retrieval.summaries import MinMaxSummary, make_summary
from tiercache.retrieval.evaluate import capture
from tiercache.retrieval.selector import Plan

BUDGETS = (0.1, 0.25)
BLOCK = 8


def fact_span(tok, ids: list[int], statement: str) -> tuple[int, int]:
    """Token range of the planted ``statement`` in ``ids`` (``plant_facts`` inserts its ids as is)."""
    planted = tok(f"\n{statement}\n", add_special_tokens=False)["input_ids"]
    for at in range(len(ids) - len(planted) + 1):
        if ids[at : at + len(planted)] == planted:
            return at, at + len(planted)
    raise ValueError(f"fact {statement!r} not found in the stream")


class Layer:
    """One layer's question against the context: queries ``(P, H, D)`` of the question positions,
    the context's keys ``(KV, past, D)``, their summaries, and full attention's block masses."""

    def __init__(self, queries: torch.Tensor, keys: torch.Tensor, past: int, span: tuple[int, int],
                 scaling: float):
        self.q, self.scaling, self.past = queries, scaling, past
        P, H, D = queries.shape
        kv = keys.shape[0]
        self.ctx = keys[:, :past]
        whole = past // BLOCK * BLOCK
        self.summaries = self.summarized("minmax", BLOCK)
        self.centres = self.ctx[:, :whole].unflatten(1, (-1, BLOCK)).mean(2)  # (KV, complete blocks, D)
        # Full attention of each position over the context and the question up to it (causal).
        expanded = keys.float().repeat_interleave(H // kv, 0)
        logits = torch.einsum("phd,htd->pht", queries.float(), expanded) * scaling
        n = keys.shape[1]
        causal = torch.arange(n)[None, :] > (past + torch.arange(P))[:, None]
        probs = torch.softmax(logits.masked_fill(causal[:, None], float("-inf")), -1)[..., :past]
        self.n_blocks = -(-past // BLOCK)
        pad = self.n_blocks * BLOCK - past
        self.mass = torch.nn.functional.pad(probs, (0, pad)).view(P, H, self.n_blocks, BLOCK).sum(-1)
        fact = torch.zeros(past)
        fact[span[0] : span[1]] = 1
        fact_probs = torch.nn.functional.pad(probs * fact, (0, pad))
        self.fact_mass = fact_probs.view(P, H, self.n_blocks, BLOCK).sum(-1)

    def summarized(self, spec: str, unit: int) -> torch.Tensor:
        """The context's complete units of ``unit`` tokens, summarised by ``spec`` (``make_summary``)."""
        whole = self.past // unit * unit
        return make_summary(spec).summarize(self.ctx[None, :, :whole].unflatten(2, (-1, unit)))

    def score(self, read: torch.Tensor) -> dict:
        """Metrics of a selection: ``read`` ``(P or 1, n_blocks)`` booleans."""
        m = read[:, None].float()
        recall = (self.mass * m).sum(-1) / self.mass.sum(-1).clamp(min=1e-30)      # (P, H)
        fact = (self.fact_mass * m).sum(-1)                                           # (P, H)
        return {"recall": float(recall.mean()), "recall_last": float(recall[-1].mean()),
                "fact_read": float(fact.sum()), "fact_all": float(self.fact_mass.sum()),
                "fact_last_read": float(fact[-1].sum()), "fact_last_all": float(self.fact_mass[-1].sum()),
                "union": float(read.any(0).sum()) * BLOCK / self.past}


def as_mask(blocks: torch.Tensor, n_blocks: int) -> torch.Tensor:
    return torch.zeros(blocks.shape[0], n_blocks, dtype=torch.bool).scatter_(1, blocks, True)


def top_with_forced(plan: Plan, score: torch.Tensor) -> torch.Tensor:
    """The ``plan.read`` blocks of highest ``score`` ``(n_blocks,)``, sink and window forced."""
    score = score.clone()
    score[: plan.sink] = float("inf")
    score[plan.n_blocks - plan.window :] = float("inf")
    return score.topk(plan.read).indices[None]


def per_position_votes(s: Selector, plan: Plan, L: Layer) -> torch.Tensor:
    P, H, D = L.q.shape
    return s.votes(plan, L.q.view(P, H, 1, D), L.summaries.expand(P, *L.summaries.shape[1:]), None, L.scaling)


def union_trimmed(s: Selector, plan: Plan, L: Layer) -> torch.Tensor:
    votes = per_position_votes(s, plan, L)                             # (P, n_blocks)
    rank = votes.argsort(-1, descending=True).argsort(-1)
    best = rank.min(0).values.float()
    total = votes.masked_fill(votes.isinf(), 0).sum(0)
    return top_with_forced(plan, -best + total / (total.max() + 1))


def summary_attention(plan: Plan, L: Layer, logits: torch.Tensor) -> torch.Tensor:
    """Top blocks by the softmax mass of ``logits`` ``(KV, group * P, complete blocks)``, summed."""
    share = torch.softmax(logits.float(), -1).sum((0, 1))
    score = torch.nn.functional.pad(share, (0, plan.n_blocks - share.shape[0]))
    return top_with_forced(plan, score)


def selections(budget: float) -> dict[str, Callable[[Plan, Layer], torch.Tensor]]:
    cfg = RetrievalConfig(budget=budget)
    cpu = torch.device("cpu")
    joint = Selector(cfg, BLOCK, BLOCK, MinMaxSummary(), cpu)
    soft = Selector(replace(cfg, gqa_aggregate="softmax"), BLOCK, BLOCK, MinMaxSummary(), cpu)

    def joint_with(spec: str, unit: int):
        """Today's joint vote over another summary (a diagnostic)."""
        s = Selector(cfg, BLOCK, unit, make_summary(spec), cpu)
        # Its own plan: the same blocks, but units of its size (cfg has no per-layer settings).
        return lambda plan, L: s.select(s.plan(0, plan.n_tokens), L.q.permute(1, 0, 2)[None],
                                        L.summarized(spec, unit), None, L.scaling)

    def grouped(L: Layer) -> torch.Tensor:  # (KV, group * P, D), as the selector groups heads
        P, H, D = L.q.shape
        return L.q.permute(1, 0, 2).reshape(L.summaries.shape[1], -1, D)

    def snap(w: int | None):
        def pick(plan, L):
            q = L.q[-w:] if w else L.q
            return soft.select(plan, q.permute(1, 0, 2)[None], L.summaries, None, L.scaling)
        return pick

    def oracle(plan, L):
        return top_with_forced(plan, L.mass.sum((0, 1)))

    def positions(first: int):
        """The joint vote of the question positions from ``first`` on."""
        return lambda plan, L: joint.select(plan, L.q[first:].permute(1, 0, 2)[None], L.summaries, None,
                                            L.scaling)

    return {
        "joint vote (today)": positions(0),
        "last position": positions(-1),
        "joint vote W=8": positions(-8),
        "per position": lambda plan, L: per_position_votes(joint, plan, L).topk(plan.read, -1).indices,
        "votes summed": lambda plan, L: per_position_votes(joint, plan, L).sum(0).topk(plan.read).indices[
            None],
        "union trimmed": lambda plan, L: union_trimmed(joint, plan, L),
        "snapkv W=8": snap(8),
        "snapkv W=all": snap(None),
        "summary attention": lambda plan, L: summary_attention(
            plan, L, MinMaxSummary().score(grouped(L), L.summaries[0], L.scaling)),
        "estimate attention": lambda plan, L: summary_attention(
            plan, L, torch.einsum("kqd,kbd->kqb", grouped(L).float(), L.centres.float()) * L.scaling
            + math.log(BLOCK)),
        "joint vote, minmax 4-token units": joint_with("minmax", 4),
        "joint vote, landmarks:2": joint_with("landmarks:2", BLOCK),
        "joint vote, landmarks:4": joint_with("landmarks:4", BLOCK),
        "joint vote, exact block max": joint_with(f"landmarks:{BLOCK}", BLOCK),
        "oracle (shared set)": oracle,
    }


def run(model, tok, max_facts: int | None) -> list[dict]:
    acc: dict[tuple[str, float], list[dict]] = {}
    for ids, facts in qa_streams(tok):
        context = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.tensor([ids]), past_key_values=context, use_cache=True)
        for fact in facts[:max_facts]:
            question = tok(question_text(fact), add_special_tokens=False)["input_ids"]
            cap = capture(model, question, last_positions=len(question), decode_steps=0, past=context)
            span = fact_span(tok, ids, fact.statement)
            layers = [Layer(q, k, len(ids), span, cap.scaling) for q, k in zip(cap.queries, cap.keys)]
            for b in BUDGETS:
                config = RetrievalConfig(budget=b)
                plan_of = Selector(config, BLOCK, BLOCK, MinMaxSummary(), torch.device("cpu"))
                for name, pick in selections(b).items():
                    per_layer = []
                    for i, L in enumerate(layers):
                        plan = plan_of.plan(i, len(ids))
                        read = {"read": plan.read_tokens / len(ids)}
                        per_layer.append(L.score(as_mask(pick(plan, L), L.n_blocks)) | read)
                    acc.setdefault((name, b), []).append({
                        "recall": np.mean([r["recall"] for r in per_layer]),
                        "recall_last": np.mean([r["recall_last"] for r in per_layer]),
                        "fact": sum(r["fact_read"] for r in per_layer)
                        / sum(r["fact_all"] for r in per_layer),
                        "fact_last": sum(r["fact_last_read"] for r in per_layer)
                        / sum(r["fact_last_all"] for r in per_layer),
                        "union": np.mean([r["union"] for r in per_layer]),
                        "read": np.mean([r["read"] for r in per_layer])})
            print(f"{fact.answer}: {len(question)} question tokens", flush=True)
    rows = []
    for (name, b), qs in acc.items():
        rows.append({"selection": name, "budget": b, "questions": len(qs),
                     **{k: float(np.mean([q[k] for q in qs])) for k in qs[0]},
                     "fact_worst": float(min(q["fact"] for q in qs))})
    return sorted(rows, key=lambda r: r["budget"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first 2 facts of each stream")
    ap.add_argument("--out", default="bench_question")
    args = parse_args(ap)
    torch.manual_seed(0)
    model, tok = load_default_model()
    start = time.perf_counter()
    rows = run(model, tok, max_facts=2 if args.quick else None)
    print(f"\nquestion selections at an equal read, SmolLM2-135M, on {machine()['device']}, "
          f"{time.perf_counter() - start:.0f} s")
    print_table(rows, ["selection", "budget", "questions", "read", "union", "recall", "recall_last", "fact",
                       "fact_last", "fact_worst"])
    write_results(args.out, rows, budgets=BUDGETS, block_tokens=BLOCK)


if __name__ == "__main__":
    main()
