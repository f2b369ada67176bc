"""Retrieval: unit summaries, the unit index, read plans and the tensor selection; one test on
real SmolLM2 KV."""

from __future__ import annotations

import math

import pytest
import torch

from tiercache.config import RetrievalConfig
from tiercache.errors import ConfigError, ShapeError
from tiercache.opcount import OpCounter
from tiercache.retrieval.index import UnitIndex
from tiercache.retrieval.selector import Selector, aggregate
from tiercache.retrieval.summaries import LandmarkSummary, MeanSummary, MinMaxSummary, make_summary

KV, G, D = 3, 3, 64


def keys_of(units: int, unit: int = 16, seed: int = 0, rows: int = 1) -> torch.Tensor:
    """``(rows, KV, units, unit, D)`` random post-RoPE keys."""
    return torch.randn(rows, KV, units, unit, D, generator=torch.Generator().manual_seed(seed))


def logits_of(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``q`` ``(KV, G, D)``, keys ``(KV, units, unit, D)`` -> ``(KV, G, units, unit)``."""
    return torch.einsum("hgd,hutd->hgut", q, keys)


# --- summaries -------------------------------------------------------------------------------


def test_mean_summary_is_the_mean_of_the_valid_tokens():
    k = keys_of(2)[0]
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 10:] = False
    s = MeanSummary().summarize(k, valid)
    assert s.shape == (KV, 2, 1, D)
    assert torch.allclose(s[:, 0, 0], k[:, 0].mean(1), atol=1e-6)
    assert torch.allclose(s[:, 1, 0], k[:, 1, :10].mean(1), atol=1e-6)


def test_quest_bound_upper_bounds_every_valid_logit_and_is_tight_for_one_token():
    summary = MinMaxSummary()
    k = keys_of(20)[0]
    valid = torch.rand(20, 16, generator=torch.Generator().manual_seed(1)) < 0.7
    valid[:, 0] = True
    q = torch.randn(KV, G, D)
    bound = summary.score(q, summary.summarize(k, valid))
    logits = logits_of(q, k).masked_fill(~valid, float("-inf"))
    assert (bound >= logits.amax(-1) - 1e-4).all()
    one = summary.summarize(k[:, :, :1])
    assert torch.allclose(summary.score(q, one), logits_of(q, k[:, :, :1])[..., 0], atol=1e-4)


def test_landmarks_with_one_per_token_give_the_max_logit():
    summary = LandmarkSummary(16)
    k = keys_of(2)[0]
    q = torch.randn(KV, G, D)
    assert torch.allclose(summary.score(q, summary.summarize(k)), logits_of(q, k).amax(-1), atol=1e-4)


def test_a_unit_of_padding_only_is_stored_as_zeros():
    k = keys_of(1)[0]
    for summary in (MeanSummary(), MinMaxSummary(), LandmarkSummary(4)):
        s = summary.summarize(k, torch.zeros(1, 16, dtype=torch.bool))
        assert torch.equal(s, torch.zeros_like(s)), summary.name


def test_summary_names_and_bad_inputs():
    assert make_summary("landmarks:8").rows == 8
    for bad in ("nope", "landmarks:x", "landmarks:0", "mean:2"):
        with pytest.raises(ConfigError, match="summary"):
            make_summary(bad)
    with pytest.raises(ShapeError, match="floating"):
        MeanSummary().summarize(torch.ones(KV, 4, 16, D, dtype=torch.int32))
    with pytest.raises(ShapeError, match="multiple of 3"):
        LandmarkSummary(3).summarize(keys_of(1)[0])


# --- the unit index --------------------------------------------------------------------------


def test_unit_index_stores_units_in_order_marks_padding_cuts_and_reorders():
    index = UnitIndex(MinMaxSummary(), layers=2, rows=2, kv_heads=KV, head_dim=D, unit_tokens=4,
                      device=torch.device("cpu"))
    keys = torch.randn(2, KV, 200, D)
    valid = torch.ones(2, 200, dtype=torch.bool)
    valid[1, :8] = False  # row 1 is left-padded by two units
    index.seal(1, 0, keys, valid)
    expect = MinMaxSummary().summarize(keys.view(2, KV, 50, 4, D), valid.view(2, 1, 50, 4))
    assert torch.equal(index.data[1][:, :, :50], expect)
    assert index.bias[0, :50].eq(0).all() and index.bias[1, :2].isneginf().all() and index.bias[1, 2:50].eq(0).all()
    index.cut(40)
    assert index.bias[:, 40:].eq(0).all() and index.bias[1, :2].isneginf().all()  # forgotten, as if never sealed
    index.reorder(torch.tensor([1, 1, 0]))
    assert index.rows == 3
    assert torch.equal(index.data[1][2, :, :50], expect[0]) and torch.equal(index.data[1][1, :, :50], expect[1])
    with pytest.raises(ShapeError, match="multiple of 4 tokens"):
        index.seal(0, 0, torch.randn(3, KV, 6, D), torch.ones(3, 6, dtype=torch.bool))


# --- read plans ------------------------------------------------------------------------------


def selector(**cfg) -> Selector:
    config = RetrievalConfig(**{"sink_tokens": 16, "window_tokens": 64, "budget": 0.1, **cfg})
    return Selector(config, block_tokens=16, unit_tokens=4, summary=MinMaxSummary(), device=torch.device("cpu"))


@pytest.mark.parametrize("budget", [0.1, 0.3, 400])
@pytest.mark.parametrize("n_tokens", [1000, 1024, 1500])
def test_a_plan_reads_at_most_the_budget_and_keeps_sink_and_window(budget, n_tokens):
    plan = selector(sink_tokens=20, budget=budget).plan(0, n_tokens)
    budget_tokens = budget if isinstance(budget, int) else math.floor(budget * n_tokens)
    assert plan.read_tokens <= budget_tokens < plan.read_tokens + 16  # whole blocks, rounded down
    assert (plan.sink, plan.window) == (2, 4)  # 20 tokens round up to 2 blocks; 64 are 4
    assert plan.top == (plan.read - 6) * 4  # units ranked per head: the retrieved blocks' worth


def test_short_contexts_shrink_the_window_and_full_budgets_read_everything():
    s = selector()
    plan = s.plan(0, 700)  # 10% is 70 tokens: the open block (12 tokens) and 3 more
    assert (plan.read, plan.sink, plan.window, plan.top) == (4, 1, 3, 0)
    assert s.plan(0, 100).full is False and s.plan(0, 100).read == 1  # the open block alone
    assert s.plan(0, 1024).read_tokens == 96
    assert selector(budget=1.0).plan(0, 1001).full
    assert selector(full_attention_layers=(2,)).plan(2, 5000).full
    assert selector(layer_budgets={3: 0.5}).plan(3, 1600).read == 50


def test_config_validation():
    for bad in (dict(gqa_aggregate="mean"), dict(summary="pca"), dict(layer_budgets={1: 1.5}),
                dict(selection_layers=(-1,)), dict(budget=0), dict(budget=1.5), dict(unit_tokens=0),
                dict(sink_tokens=-1)):
        with pytest.raises(ConfigError):
            RetrievalConfig(**bad)


# --- selection -------------------------------------------------------------------------------


def filled(n_units: int, rows: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summaries ``(rows, KV, n_units, 1, 2D)`` of random 4-token units, and their keys."""
    keys = keys_of(n_units, unit=4, seed=seed, rows=rows)
    return MinMaxSummary().summarize(keys), keys


def reference_blocks(s: Selector, plan, q: torch.Tensor, summaries: torch.Tensor, scaling: float) -> list[int]:
    """The module docstring's rule, one row, in plain Python."""
    per_block = 4
    lo, hi = plan.sink * per_block, min(plan.n_units, (plan.n_blocks - plan.window) * per_block)
    grouped = q.reshape(KV, -1, D) * scaling
    votes = [0.0] * plan.n_blocks
    for head in range(KV):
        share = aggregate(MinMaxSummary().score(grouped[head : head + 1], summaries[head : head + 1, lo:hi]),
                          s.config.gqa_aggregate, 1.0)[0]
        for rank, unit in enumerate(share.topk(plan.top).indices.tolist()):
            votes[(lo + unit) // per_block] += 1 / (rank + 1)
    forced = list(range(plan.sink)) + list(range(plan.n_blocks - plan.window, plan.n_blocks))
    free = sorted((b for b in range(plan.n_blocks) if b not in forced), key=lambda b: (-votes[b], -b))
    return sorted(forced + free[: plan.read - len(forced)])


@pytest.mark.parametrize("aggregate_", ["softmax", "max", "sum"])
def test_selection_follows_the_heads_votes(aggregate_):
    s = selector(gqa_aggregate=aggregate_, budget=0.2)
    summaries, _ = filled(256)  # 1024 tokens
    plan = s.plan(0, 1024)
    for seed in range(5):
        q = torch.randn(1, KV * G, 1, D, generator=torch.Generator().manual_seed(seed))
        got = s.select(plan, q, summaries, None, D**-0.5)
        assert got.shape == (1, plan.read)
        votes = s.votes(plan, q, summaries, None, D**-0.5)
        assert votes.shape == (1, plan.n_blocks) and torch.equal(votes.topk(plan.read).indices, got)
        assert sorted(got[0].tolist()) == reference_blocks(s, plan, q[0], summaries[0], D**-0.5)


def test_rows_select_independently_and_padding_never_votes():
    s = selector(budget=0.2)
    summaries, _ = filled(256, rows=2, seed=3)
    q = torch.randn(2, KV * G, 1, D)
    plan = s.plan(0, 1024)
    both = s.select(plan, q, summaries, None, D**-0.5)
    for row in range(2):
        alone = s.select(plan, q[row : row + 1], summaries[row : row + 1], None, D**-0.5)[0]
        assert torch.equal(both[row].sort().values, alone.sort().values)
    # Row 1's first 100 units are padding: no block of theirs is read but the sink.
    bias = torch.zeros(2, 256)
    bias[1, :100] = float("-inf")
    padded = s.select(plan, q, summaries, bias, D**-0.5)
    assert torch.equal(padded[0].sort().values, both[0].sort().values)
    assert ((padded[1] >= 25) | (padded[1] == 0)).all()


def test_a_multi_token_query_and_held_blocks():
    s = selector(budget=0.2)
    summaries, _ = filled(256)
    plan = s.plan(0, 1024)
    blocks = s.select(plan, torch.randn(1, KV * G, 5, D), summaries, None, D**-0.5)
    assert blocks.shape == (1, plan.read)
    forced = set(range(plan.sink)) | set(range(plan.n_blocks - plan.window, plan.n_blocks))
    retrieved = torch.tensor([sorted(set(blocks[0].tolist()) - forced)])
    later = s.plan(0, 1100)
    held = s.with_held(later, retrieved)
    assert set(held[0].tolist()) == set(retrieved[0].tolist()) | set(range(later.sink)) \
        | set(range(later.n_blocks - later.window, later.n_blocks))


def test_a_question_reads_the_block_one_of_its_positions_points_to():
    """A question's joint vote (bench_question.py measured it ahead of per-position, union,
    SnapKV-window and summary-attention selections on planted facts): the block a single middle
    position matches is read, though the last position alone would not read it."""
    s = selector(budget=0.2)  # 12 blocks: sink, window and 7 retrieved
    summaries, keys = filled(256)
    plan = s.plan(0, 1024)
    q = torch.randn(1, KV * G, 6, D, generator=torch.Generator().manual_seed(4))
    target = 37  # unit 150 of block 37: far from sink (block 0) and window (blocks 60-63)
    q[0, 4, 2] = 10 * keys[0, 1, 150, 1]  # query head 4 (KV head 1), position 2 of 6: an exact key match
    assert target in s.select(plan, q, summaries, None, D**-0.5)[0].tolist()
    assert target not in s.select(plan, q[:, :, -1:], summaries, None, D**-0.5)[0].tolist()


def test_selection_is_a_sync_free_tensor_pipeline():
    s = selector()
    summaries, _ = filled(2048)
    plan = s.plan(0, 8192)
    q = torch.randn(1, KV * G, 1, D)
    s.select(plan, q, summaries, None, 0.125)
    with OpCounter() as counter:
        s.select(plan, q, summaries, None, 0.125)
    assert counter.syncs == 0, counter.sync_ops
    assert counter.ops <= 30, counter.by_op


def test_capture_after_a_prefilled_context_matches_one_pass_and_leaves_the_context():
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from tiercache.retrieval.evaluate import capture

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()
    ids = torch.randint(0, 100, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    whole = capture(model, ids, last_positions=6, decode_steps=0)
    context = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([ids[:34]]), past_key_values=context, use_cache=True)
    after = capture(model, ids[34:], last_positions=6, decode_steps=0, past=context)
    assert context.get_seq_length() == 34  # cropped back for the next question
    assert torch.equal(after.positions, whole.positions) and after.positions.tolist() == list(range(34, 40))
    for a, b in zip(after.queries + after.keys, whole.queries + whole.keys):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --- real model ------------------------------------------------------------------------------


@pytest.mark.model
def test_recall_on_real_smollm2_kv(smollm2):
    """At a 10% read budget over 1K tokens of prose (sink 16 + window 64 tokens counted in it),
    SmolLM2's real queries keep most of their attention mass in the blocks read: 4-token units
    voted into 16-token blocks measured 0.745 (the floor is a few points below)."""
    from tiercache.corpus import text_tokens
    from tiercache.retrieval.evaluate import attention_probs, capture, mass_recall

    model, tokenizer = smollm2
    cap = capture(model, text_tokens(tokenizer, 1024), last_positions=4, decode_steps=2)
    kv_heads, _, head_dim = cap.keys[0].shape
    s = Selector(RetrievalConfig(sink_tokens=16, window_tokens=64, budget=0.1), 16, 4, MinMaxSummary(),
                 torch.device("cpu"))
    recalls = []
    for layer, keys in enumerate(cap.keys):
        summaries = MinMaxSummary().summarize(keys[None, :, : keys.shape[1] // 4 * 4].unflatten(2, (-1, 4)))
        for step, n in enumerate((cap.positions + 1).tolist()):
            plan = s.plan(layer, n)
            q = cap.queries[layer][step].view(1, -1, 1, head_dim)
            blocks = s.select(plan, q, summaries, None, cap.scaling)[0]
            probs = attention_probs(cap.queries[layer][step], keys[:, :n], cap.scaling)
            recalls.append(mass_recall(probs, blocks, 16))
    assert torch.cat(recalls).mean() > 0.72
