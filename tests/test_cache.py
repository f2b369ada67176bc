"""TieredCache on SmolLM2-135M-Instruct (fp32, CPU): exactness against DynamicCache, device budget,
batches, and the errors for unsupported models and mismatched caches."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from tiercache import ConfigError, RetrievalConfig, ShapeError, TierConfig, TierName, UnsupportedModelError
from tiercache.hf.cache import TieredCache
from tiercache.corpus import text_tokens
from helpers import kv_bytes

pytestmark = pytest.mark.model

BLOCK = 32


@pytest.fixture(autouse=True)
def keeps_its_own_attention(smollm2):
    """No test switches the model back: TieredCache's forwards leave it on its own attention."""
    yield
    assert smollm2[0].config._attn_implementation == "sdpa"


def exact_config(model, tokens: int, device_fraction: float) -> TierConfig:
    """Whole-context retrieval budget, raw codecs, a device holding ``device_fraction`` of the KV."""
    block = kv_bytes(model, BLOCK) // model.config.num_hidden_layers
    device = max(int(kv_bytes(model, tokens) * device_fraction), block * (2 * model.config.num_hidden_layers + 8))
    return TierConfig(device_budget_bytes=device, host_budget_bytes=2 * kv_bytes(model, tokens), block_tokens=BLOCK,
                      dtype=torch.float32, device="cpu", retrieval=RetrievalConfig(budget=1.0))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def run_steps(model, ids: torch.Tensor, cache, steps: int) -> list[torch.Tensor]:
    """Prefill ``ids`` then ``steps`` greedy decode steps; the logits of the last position each time."""
    out = model(ids, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        out = model(nxt, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("tokens, device_fraction", [
    (1024, 0.25),
    pytest.param(1024, 1.0, marks=pytest.mark.slow),
    pytest.param(4096, 0.25, marks=pytest.mark.slow),
])
def test_logits_match_dynamic_cache(smollm2, tokens, device_fraction):
    model, tok = smollm2
    ids = torch.tensor([text_tokens(tok, tokens, offset_tokens=500)])
    ref = run_steps(model, ids, DynamicCache(config=model.config), 4)
    cache = TieredCache(model, exact_config(model, tokens, device_fraction))
    got = run_steps(model, ids, cache, 4)
    for step, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b) < 1e-4, f"step {step}: relative error {rel_err(a, b):.2e}"
    s = cache.manager.stats()
    assert s.peak_bytes["device"] <= cache.config.device_budget_bytes
    if device_fraction < 1:
        # The cache is 4x the device budget: blocks really moved between the tiers.
        assert cache.manager.used_bytes(TierName.HOST) > 2 * cache.manager.used_bytes(TierName.DEVICE)
        assert s.moved_bytes["host->device"] > 0 and s.moved_bytes["device->host"] > 0
    cache.close()


def test_generate_runs_with_a_tiered_cache_and_agrees(smollm2):
    model, tok = smollm2
    ids = torch.tensor([text_tokens(tok, 400, offset_tokens=3000)])
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    cache = TieredCache(model, exact_config(model, 420, 0.3))
    got = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, ref)
    assert cache.get_seq_length() == ids.shape[1] + 7  # the last token is generated, never cached
    cache.close()


def test_batch_of_two_matches_each_sequence_alone(smollm2):
    model, tok = smollm2
    a = text_tokens(tok, 200, offset_tokens=100)
    b = text_tokens(tok, 200, offset_tokens=9000)
    cfg = exact_config(model, 450, 1.0)
    both = run_steps(model, torch.tensor([a, b]), TieredCache(model, cfg), 2)
    for row, ids in enumerate((a, b)):
        alone = run_steps(model, torch.tensor([ids]), TieredCache(model, cfg), 2)
        for x, y in zip(both, alone):
            assert rel_err(x[row], y[0]) < 1e-4


def test_sparse_decode_reads_exactly_its_budget(smollm2):
    """A decode step reads the budget's storage blocks, sink and window included, and no more
    (``index="blocks"``)."""
    model, tok = smollm2
    n = 2048
    ids = torch.tensor([text_tokens(tok, n, offset_tokens=20000)])
    retrieval = RetrievalConfig(budget=0.1, sink_tokens=16, window_tokens=64, unit_tokens=4, index="blocks")
    cache = TieredCache(model, dataclasses.replace(exact_config(model, n, 0.25), retrieval=retrieval))
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        before = cache.manager.stats().lookups
        model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    per_layer = (cache.manager.stats().lookups - before) / model.config.num_hidden_layers
    plan = cache.step.selector.plan(0, n + 1)
    # 10% of 2049 tokens is 204: the open block (1 token) and 6 whole blocks of 32.
    assert (plan.read, plan.sink, plan.window) == (7, 1, 2)
    assert per_layer == plan.read
    assert plan.read_tokens <= 0.1 * (n + 1) < plan.read_tokens + BLOCK
    assert cache.attended_fraction == pytest.approx(plan.read_tokens / (n + 1))
    cache.close()


def test_token_decode_reads_exactly_its_budget_per_kv_head(smollm2):
    """With the token index, every KV head of every layer reads exactly the budget's tokens at a
    decode step (sink and window included), all of them from host memory, and the cache reports
    that fraction."""
    model, tok = smollm2
    n = 2048
    ids = torch.tensor([text_tokens(tok, n, offset_tokens=20000)])
    retrieval = RetrievalConfig(budget=0.1, sink_tokens=16, window_tokens=64)
    cache = TieredCache(model, dataclasses.replace(exact_config(model, n, 0.25), retrieval=retrieval))
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        before = cache.manager.stats()
        model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    after = cache.manager.stats()
    read = int(0.1 * (n + 1))  # 204 tokens of 2049
    heads = model.config.num_hidden_layers * model.config.num_key_value_heads
    assert after.tokens_read - before.tokens_read == heads * read
    assert after.tokens_from_host - before.tokens_from_host == heads * read
    assert cache.attended_fraction == pytest.approx(read / (n + 1))
    cache.close()


def test_errors(smollm2):
    model, _ = smollm2
    from transformers import GPTJConfig, GPTJForCausalLM

    gptj = GPTJForCausalLM(GPTJConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=50, rotary_dim=8))
    with pytest.raises(UnsupportedModelError, match="model type 'gptj'"):
        TieredCache(gptj)
    block = kv_bytes(model, BLOCK) // model.config.num_hidden_layers
    tiny = TierConfig(device_budget_bytes=block * 30 * 2, host_budget_bytes=1 << 24,
                      block_tokens=BLOCK, dtype=torch.float32, device="cpu")
    with pytest.raises(ConfigError, match="holds 2 blocks .* per layer .* needs at least 3 per layer"):
        TieredCache(model, tiny)
    half = TierConfig(device_budget_bytes=1 << 24, host_budget_bytes=1 << 24, dtype=torch.float16, device="cpu")
    with pytest.raises(ConfigError, match="differs from the model"):
        TieredCache(model, half)
    cache = TieredCache(model, exact_config(model, 256, 1.0))
    with pytest.raises(ShapeError, match="do not match the cache's 3 KV heads"):
        cache.update(torch.zeros(1, 4, 2, 64), torch.zeros(1, 4, 2, 64), 0)


def test_truncate_export_and_import_round_trip(smollm2):
    model, tok = smollm2
    ids = torch.tensor([text_tokens(tok, 300, offset_tokens=700)])
    cfg = exact_config(model, 400, 0.5)
    cache = TieredCache(model, cfg)
    with torch.no_grad():
        model(ids[:, :250], past_key_values=cache, use_cache=True)
        kv250 = cache.export_kv()
        model(ids[:, 250:], past_key_values=cache, use_cache=True)  # e.g. a question
        cache.truncate(250)
        assert cache.get_seq_length() == 250
        assert torch.equal(cache.export_kv(), kv250)
        # Continuing after the truncation equals continuing from a cache rebuilt by import_kv.
        after_truncate = model(ids[:, 250:260], past_key_values=cache, use_cache=True).logits
        fresh = TieredCache(model, cfg)
        fresh.import_kv(kv250)
        after_import = model(ids[:, 250:260], past_key_values=fresh, use_cache=True).logits
        ref = model(ids[:, :260], past_key_values=TieredCache(model, cfg), use_cache=True).logits[:, 250:]
    assert rel_err(after_truncate, ref) < 1e-4 and rel_err(after_import, ref) < 1e-4
    with pytest.raises(ShapeError, match="already holds tokens"):
        fresh.import_kv(kv250)
    with pytest.raises(ShapeError, match="does not match"):
        TieredCache(model, cfg).import_kv(kv250[:, :, :2])
    cache.close()
    fresh.close()
