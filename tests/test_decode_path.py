"""The decode step on the GPU's terms, checked on the CPU with a random Llama-shape model: no host
sync, few aten ops per layer (each is a kernel launch on a GPU) and not more with context, one
layer's decode attention captured whole by torch.compile, and padded batches in one call."""

from __future__ import annotations

import statistics

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from tiercache import RetrievalConfig, TierConfig
from tiercache.hf.cache import TieredCache
from tiercache.opcount import OpCounter
from helpers import kv_bytes

LAYERS, BLOCK = 8, 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=LAYERS, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1 << 16)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(autouse=True)
def keeps_its_own_attention(model):
    """No test switches the model back: TieredCache's forwards leave it on its own attention."""
    yield
    assert model.config._attn_implementation == "sdpa"


def config(model, tokens: int, budget: float, device_fraction: float = 0.25, block: int = BLOCK,
           index: str = "tokens") -> TierConfig:
    return TierConfig(device_budget_bytes=int(kv_bytes(model, tokens) * device_fraction),
                      host_budget_bytes=2 * kv_bytes(model, tokens), block_tokens=block, dtype=torch.float32,
                      device="cpu", retrieval=RetrievalConfig(budget=budget, index=index))


@torch.no_grad()
def decode_counts(model, cache, context: int, steps: int) -> list[OpCounter]:
    """Prefill ``context`` random tokens into ``cache``, then count each of ``steps`` decode steps."""
    ids = torch.randint(0, 1000, (1, context), generator=torch.Generator().manual_seed(1))
    token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    counters = []
    for _ in range(steps):
        with OpCounter() as counter:
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        counters.append(counter)
    return counters


@pytest.mark.parametrize("index", ["tokens", "blocks"])
@pytest.mark.parametrize("budget", [0.1, 1.0])
def test_decode_steps_never_sync_with_the_host(model, budget, index):
    """Every step of a whole block cycle (a block fills and a new one opens), with 75% of the KV
    in host memory: token retrieval reads its tokens there in place (and indexes the tokens it
    seals); block retrieval copies blocks to the device, and at budget 1.0 streams them through
    the device in groups."""
    cache = TieredCache(model, config(model, 2048 + BLOCK + 1, budget, index=index))
    counters = decode_counts(model, cache, 2048, BLOCK + 1)
    syncs = [c.syncs for c in counters]
    assert syncs == [0] * len(syncs), [dict(c.sync_ops) for c in counters if c.syncs]
    stats = cache.manager.stats()
    assert (stats.tokens_from_host if index == "tokens" else stats.device_misses) > 0  # KV came from host memory


def test_aten_ops_per_layer_are_at_most_twice_dynamic_cache_and_flat_in_context(model):
    """Over two block cycles of the default blocks at a 10% budget: on average at most 2x
    DynamicCache's ops per layer (each a GPU kernel launch), and a typical step (the median) costs
    the same at 1K and 4K tokens: the smallest context where the 10% read holds retrieved blocks
    beside sink and window, and 4x it. (Steps that open a block, or change the plan's shape, add a
    few ops; which steps those are depends on where the context ends, not on its length.)"""
    dense = decode_counts(model, DynamicCache(config=model.config), 1024, 2)
    dense_per_layer = dense[-1].ops / LAYERS
    block = TierConfig.__dataclass_fields__["block_tokens"].default
    typical, mean = {}, {}
    for context in (1024, 4096):
        cache = TieredCache(model, config(model, context + 2 * block + 1, 0.1, block=block))
        ops = [c.ops / LAYERS for c in decode_counts(model, cache, context, 2 * block)]
        typical[context], mean[context] = statistics.median(ops), statistics.fmean(ops)
    assert typical[1024] == typical[4096], typical
    assert max(mean.values()) <= 2 * dense_per_layer, (mean, dense_per_layer)


def test_one_layers_decode_attention_compiles_without_graph_breaks(model):
    """torch.compile(fullgraph=True) of a layer's decode attention (selection, residency, paged
    attention, the write of the new token): the CPU stand-in for capturing it in a CUDA graph.
    Three steps, one of which fills a selection unit."""
    cache = TieredCache(model, config(model, 1200, 0.1))
    inputs = {}
    original = TieredCache.attend

    def spy(self, layer, query, keys, values, mask, scaling):
        if layer == 0:
            inputs.update(query=query, keys=keys, values=values, scaling=scaling)
        return original(self, layer, query, keys, values, mask, scaling)

    with torch.no_grad():
        ids = torch.randint(0, 1000, (1, 1000), generator=torch.Generator().manual_seed(2))
        token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        TieredCache.attend = spy
        try:
            model(token, past_key_values=cache, use_cache=True)
        finally:
            TieredCache.attend = original

    def layer_step(query, keys, values):
        return cache.step.attend(0, query, keys, values, None, inputs["scaling"])

    compiled = torch.compile(layer_step, fullgraph=True, backend="eager", dynamic=False)
    for _ in range(3):  # positions 1001..1003: 1003 fills unit 250
        out = compiled(inputs["query"], inputs["keys"], inputs["values"])
        cache.step.kv.lengths[1:] = [cache.step.kv.lengths[0]] * (LAYERS - 1)
    assert out.shape == (1, 1, 8, 32) and torch.isfinite(out).all()
    torch._dynamo.reset()


@pytest.mark.parametrize("index", ["tokens", "blocks"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_a_padded_batch_matches_dynamic_cache(model, padding_side, index):
    """Prompts of 40, 65 and 90 tokens in one padded batch: at full budget, with blocks moving
    between the tiers, the real positions' logits match DynamicCache; with left padding (what
    generate uses), greedy generation gives the same tokens."""
    g = torch.Generator().manual_seed(3)
    lengths = (40, 65, 90)
    ids = torch.zeros(3, 90, dtype=torch.long)
    mask = torch.zeros(3, 90, dtype=torch.long)
    for row, n in enumerate(lengths):
        span = slice(90 - n, 90) if padding_side == "left" else slice(0, n)
        ids[row, span] = torch.randint(1, 1000, (n,), generator=g)
        mask[row, span] = 1
    cfg = config(model, 3 * 140, 1.0, device_fraction=0.7, index=index)  # 9 slots a layer: blocks still move
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config)).logits
        got = model(ids, attention_mask=mask, past_key_values=TieredCache(model, cfg)).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)
    if padding_side == "left":
        ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        cache = TieredCache(model, cfg)
        got_tokens = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=12,
                                    do_sample=False, pad_token_id=0)
        assert torch.equal(got_tokens, ref_tokens)
        stats = cache.manager.stats()
        assert (stats.tokens_from_host if index == "tokens" else stats.device_misses) > 0
