"""TieredCache as transformers' ``Cache``: the methods ``generate`` and its decoding strategies
call (``reorder_cache``, ``crop``, ``batch_repeat_interleave``, ``batch_select_indices``,
``reset``, ``__len__``, ``__deepcopy__``, ``get_mask_sizes``), the attention implementation that
stays the model's own outside TieredCache's forwards, the device-room check for the batch that
arrives, windowed layers, and the families refused. Each against DynamicCache on tiny random
models (``helpers``) with blocks moving between device and host."""

from __future__ import annotations

import copy
import dataclasses
import types

import pytest
import torch
import transformers as hf
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_chunked_causal_mask, create_sliding_window_causal_mask

from tiercache import ConfigError, ShapeError, UnsupportedModelError
from tiercache.hf.cache import TieredCache, default_config
from tiercache.opcount import OpCounter
from helpers import CHUNK, WINDOW, kv_bytes, kv_came_from_host, tiered_config, tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def ids(rows: int, tokens: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 128, (rows, tokens), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def steps(model, caches, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Feed ``tokens`` ``(rows, n)`` one at a time into each cache; the last logits of each."""
    out = []
    for cache in caches:
        for i in range(tokens.shape[1]):
            logits = model(tokens[:, i : i + 1], past_key_values=cache).logits
        out.append(logits)
    return out


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- attention implementation


def test_the_model_keeps_its_own_attention_outside_tiered_forwards(llama):
    """Building a TieredCache and generating with it leaves the model on its implementation (sdpa,
    or eager); a later padded DynamicCache generate is unchanged; a forward that fails midway
    still restores it."""
    batch = ids(2, 20)
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    before = llama.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    cache = TieredCache(llama, tiered_config(llama, rows=2))
    assert llama.config._attn_implementation == "sdpa"
    seen = []
    original = TieredCache.attend

    def spy(self, layer, query, keys, values, mask, scaling):
        seen.append(llama.config._attn_implementation)
        return original(self, layer, query, keys, values, mask, scaling)

    TieredCache.attend = spy
    try:
        llama.generate(batch, attention_mask=mask, past_key_values=cache, max_new_tokens=6, do_sample=False)
    finally:
        TieredCache.attend = original
    assert set(seen) == {"tiercache"} and llama.config._attn_implementation == "sdpa"
    after = llama.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(after, before)
    with pytest.raises(ShapeError, match="batch of 3"):
        llama(ids(3, 4), past_key_values=cache)
    assert llama.config._attn_implementation == "sdpa"
    eager = tiny_model("llama", attn="eager")
    TieredCache(eager, tiered_config(eager))
    eager(ids(1, 5), past_key_values=TieredCache(eager, tiered_config(eager)))
    assert eager.config._attn_implementation == "eager"


# ---------------------------------------------------------------- sizes and masks


@pytest.mark.parametrize("family", ["gemma3", "llama4"])
def test_len_and_mask_sizes_for_every_mask_kind(family):
    """``len`` is the number of layers; every mask kind transformers builds for the
    ``"tiercache"`` attention (full, sliding, chunked) is the 2-D padding mask over every cached
    token and the query, as ``get_mask_sizes`` says."""
    model = tiny_model(family)
    cache = TieredCache(model, tiered_config(model, rows=2))
    assert len(cache) == 2 and cache.batch_size == -1
    # Per layer, as transformers' caches report them (generate reads them).
    assert cache.is_sliding == [True, False]  # layer 0 slides (Gemma 3) or is chunked (Llama 4)
    assert cache.is_linear == cache.is_dummy == [False, False]
    with torch.no_grad():
        model(ids(2, 30), past_key_values=cache)
    assert cache.batch_size == 2
    for layer in range(2):
        assert cache.get_mask_sizes(5, layer) == (35, 0)
    config = copy.copy(model.config)
    config._attn_implementation_internal = "tiercache"
    padding = torch.ones(2, 35, dtype=torch.long)
    padding[1, :4] = 0
    embeds = torch.zeros(2, 5, 64)
    builders = [create_causal_mask] + ([create_sliding_window_causal_mask] if family == "gemma3" else
                                       [create_chunked_causal_mask])
    for build in builders:
        mask = build(config=config, inputs_embeds=embeds, attention_mask=padding, past_key_values=cache)
        assert torch.equal(mask, padding.bool()), build.__name__


# ---------------------------------------------------------------- beams and rows


def test_reorder_cache_shares_blocks_and_copies_only_open_blocks(llama):
    """Beam search's reorder: rows become copies of others. Blocks are shared (no KV copied but
    the open block of each row that now shares one), and the next steps match DynamicCache."""
    prompt = ids(3, 42)  # 10 full blocks and an open one of 2 tokens
    ref, cache = DynamicCache(config=llama.config), TieredCache(llama, tiered_config(llama, rows=3))
    with torch.no_grad():
        for c in (ref, cache):
            llama(prompt, past_key_values=c)
    moved = cache.manager.stats().moved_bytes
    for order in ([2, 0, 2], [1, 1, 1], [2, 1, 0]):
        before = moved.get("device->device", 0)
        for c in (ref, cache):
            c.reorder_cache(torch.tensor(order))
        copies = len(order) - len(set(order))
        moved = cache.manager.stats().moved_bytes
        assert moved.get("device->device", 0) - before == copies * kv_bytes(llama, 4)  # a block of each layer
        a, b = steps(llama, [ref, cache], ids(3, 3, seed=len(set(order))))
        assert_close(b, a)
    # 51 tokens. The rows forked from row 1 at 45 tokens share its 11 full blocks; block 11, open
    # then, was copied for two rows; block 12 was opened after the last reorder.
    held = cache.step.kv.table.host_pids(slice(0, cache.step.kv.table.blocks))
    assert cache.get_seq_length() == ref.get_seq_length() == 51
    assert len(set(held[:, :11].reshape(-1).tolist())) == 11
    assert len(set(held[:, 11].tolist())) == len(set(held[:, 12].tolist())) == 3
    assert cache.manager.residency.pinned[0] == 1 + 3  # the shared sink block, each row's open block


def test_batch_repeat_interleave_and_select_indices(llama):
    ref, cache = DynamicCache(config=llama.config), TieredCache(llama, tiered_config(llama, rows=4))
    with torch.no_grad():
        for c in (ref, cache):
            llama(ids(2, 30), past_key_values=c)
            c.batch_repeat_interleave(2)
    a, b = steps(llama, [ref, cache], ids(4, 3))
    assert_close(b, a)
    for c in (ref, cache):
        c.batch_select_indices(torch.tensor([3, 0]))
    a, b = steps(llama, [ref, cache], ids(2, 5, seed=4))
    assert_close(b, a)
    for c in (ref, cache):
        c.batch_select_indices(torch.tensor([False, True]))
    a, b = steps(llama, [ref, cache], ids(1, 2, seed=5))
    assert_close(b, a)
    assert cache.step.kv.table.rows == 1 and cache.get_seq_length() == ref.get_seq_length()


def test_a_batch_the_device_holds_never_fails_midway(llama):
    """The room check sizes the device for the batch that arrives: 3 rows fit a budget for 3
    (generate runs to the end, blocks moving); 4 rows are refused at the first forward, before
    anything is stored; growing the rows past the budget is refused with nothing changed."""
    config = tiered_config(llama, rows=3)
    cache = TieredCache(llama, config)
    ref = llama.generate(ids(3, 40), max_new_tokens=20, do_sample=False)
    got = llama.generate(ids(3, 40), past_key_values=cache, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, ref) and kv_came_from_host(cache.manager.stats())
    beams = TieredCache(llama, config)
    ref = llama.generate(ids(1, 40), num_beams=3, max_new_tokens=20, do_sample=False)
    assert torch.equal(llama.generate(ids(1, 40), past_key_values=beams, num_beams=3, max_new_tokens=20,
                                      do_sample=False), ref)
    full = TieredCache(llama, config)
    with pytest.raises(ConfigError, match="a batch of 4 needs at least 12 per layer"):
        llama(ids(4, 10), past_key_values=full)
    assert full.step.kv.table is None and full.get_seq_length() == 0
    with pytest.raises(ConfigError, match="a batch of 6 needs"):
        cache.batch_repeat_interleave(2)
    assert cache.step.kv.table.rows == 3
    steps(llama, [cache], ids(3, 2))  # still usable


# ---------------------------------------------------------------- crop, copy, reset


def test_crop_matches_dynamic_cache(llama):
    """transformers 5's crop (a negative count) across and within blocks, on rows that share
    blocks; a positive count or more tokens than held is refused."""
    ref, cache = DynamicCache(config=llama.config), TieredCache(llama, tiered_config(llama, rows=2))
    with torch.no_grad():
        for c in (ref, cache):
            llama(ids(1, 37), past_key_values=c)
            c.batch_repeat_interleave(2)  # the rows share every block; the open one is copied
    for remove, more in ((0, 3), (-5, 2), (-1, 4), (-9, 1)):
        for c in (ref, cache):
            c.crop(remove)
        assert cache.get_seq_length() == ref.get_seq_length()
        a, b = steps(llama, [ref, cache], ids(2, more, seed=-remove))
        assert_close(b, a)
    with pytest.raises(ShapeError, match="negative count"):
        cache.crop(3)
    with pytest.raises(ShapeError, match="holds"):
        cache.crop(-1000)
    assert cache.is_croppable


def test_deepcopy_is_an_independent_copy(llama, tmp_path):
    """transformers' prompt-reuse pattern: copy.deepcopy of a prompt's cache, then generate from
    each copy; the copies and the original go their own ways. With a disk tier, a copy needs
    another disk path."""
    prompt = ids(1, 26)
    shared = TieredCache(llama, tiered_config(llama))
    dense = DynamicCache(config=llama.config)
    with torch.no_grad():
        llama(prompt, past_key_values=shared)
        llama(prompt, past_key_values=dense)
    for seed in (1, 2):
        follow = torch.cat([prompt, ids(1, 6, seed=seed)], dim=1)
        ref = llama.generate(follow, past_key_values=copy.deepcopy(dense), max_new_tokens=8, do_sample=False)
        mine = copy.deepcopy(shared)
        assert torch.equal(llama.generate(follow, past_key_values=mine, max_new_tokens=8, do_sample=False), ref)
        assert mine.get_seq_length() == 26 + 6 + 7 and shared.get_seq_length() == 26
    assert torch.equal(shared.export_kv(), shared.copy().export_kv())
    # A host of 6 blocks a layer's worth: each layer's open block and a device's worth of blocks.
    on_disk = dataclasses.replace(tiered_config(llama), host_budget_bytes=kv_bytes(llama, 12),
                                  disk_budget_bytes=1 << 22, disk_path=tmp_path / "a")
    stored = TieredCache(llama, on_disk)
    with torch.no_grad():
        llama(prompt, past_key_values=stored)
    with pytest.raises(ConfigError, match="one writer at a time"):
        copy.deepcopy(stored)
    twin = stored.copy(dataclasses.replace(on_disk, disk_path=tmp_path / "b"))
    assert torch.equal(twin.export_kv(), stored.export_kv())
    stored.close()
    twin.close()


def test_reset_forgets_everything(llama):
    cache = TieredCache(llama, tiered_config(llama, rows=3))
    with torch.no_grad():
        llama(ids(2, 30), past_key_values=cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.step.kv.table is None
    assert all(cache.manager.residency.pinned[layer] == 0 for layer in range(2))
    ref = DynamicCache(config=llama.config)
    with torch.no_grad():
        a = llama(ids(3, 20), past_key_values=ref).logits
        b = llama(ids(3, 20), past_key_values=cache).logits
    assert_close(b, a)


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize("family, window", [("mistral-window", WINDOW), ("llama4", CHUNK)])
def test_windowed_layers_read_their_window_and_full_layers_retrieve(family, window):
    """At a 25% budget, a decode step of a sliding (or chunked) layer reads the blocks of its
    window, exactly (its logits match DynamicCache's), and a full layer reads its retrieval
    budget."""
    model = tiny_model(family)
    cache = TieredCache(model, tiered_config(model, budget=0.25))
    lookups = []
    original = cache.manager.resident

    def count(layer, pids):
        lookups.append((layer, pids.numel()))
        return original(layer, pids)

    cache.manager.resident = count
    prompt = ids(1, 80)
    with torch.no_grad():
        model(prompt, past_key_values=cache)
        lookups.clear()
        before = cache.manager.stats().tokens_read
        logits = model(ids(1, 1), past_key_values=cache).logits
    per_layer = {layer: sum(n for l, n in lookups if l == layer) for layer in range(2)}
    full = [layer for layer, w in enumerate(cache.spec.windows) if w is None]
    for layer, w in enumerate(cache.spec.windows):
        if w is not None:
            assert per_layer[layer] <= -(-window // 4) + 1
    # Full layers read their budget's tokens, every KV head its own (25% of 81 tokens).
    assert cache.manager.stats().tokens_read - before == len(full) * model.config.num_key_value_heads * 20
    if family == "mistral-window":  # every layer slides: exact at any budget
        ref = DynamicCache(config=model.config)
        with torch.no_grad():
            model(prompt, past_key_values=ref)
            assert_close(logits, model(ids(1, 1), past_key_values=ref).logits)


@pytest.mark.parametrize("family, estimated", [("llama", (True, True)), ("mistral-window", (False, False)),
                                               ("gemma3", (False, True)), ("gemma2", (False, False))])
def test_only_full_layers_without_soft_capping_estimate_the_blocks_they_skip(family, estimated):
    """At a 25% budget with estimation on (the default), a full layer adds the estimate of the
    blocks it does not read; a windowed layer (blocks outside the window weigh nothing) and every
    layer of soft-capped Gemma 2 (the estimate's lower bound fails under tanh) do not: their logits
    are those of estimation off, bit for bit."""
    model = tiny_model(family)
    config = tiered_config(model, budget=0.25)
    off = dataclasses.replace(config, retrieval=dataclasses.replace(config.retrieval, estimate=False))
    caches = [TieredCache(model, config), TieredCache(model, off)]
    assert caches[0].estimated == estimated and caches[1].estimated == (False, False)
    with torch.no_grad():
        for cache in caches:
            model(ids(1, 80), past_key_values=cache)
    on_logits, off_logits = steps(model, caches, ids(1, 3, seed=8))
    assert torch.equal(on_logits, off_logits) != any(estimated)


@pytest.mark.parametrize("family", ["mistral-window", "llama4", "gemma2"])
def test_windowed_and_soft_capped_decode_steps_never_sync(family):
    """Sliding and chunked layers (a padded batch: chunks count from each row's first real
    token) and Gemma 2's soft-capping keep the decode step free of host syncs."""
    model = tiny_model(family)
    cache = TieredCache(model, tiered_config(model, rows=2, budget=0.25))
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[1, :9] = 0
    with torch.no_grad():
        model(ids(2, 60), attention_mask=mask, past_key_values=cache)
        for step in range(6):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            with OpCounter() as counter:
                model(ids(2, 1, seed=step), attention_mask=mask, past_key_values=cache)
            assert counter.syncs == 0, dict(counter.sync_ops)


def test_default_config_keeps_the_widest_window_on_the_device():
    """Mistral's 4096-token window (here 1000 tokens over a 2000-token context, where a quarter of
    the KV would hold 500): the default device budget holds the whole window per layer."""
    torch.manual_seed(0)
    model = hf.MistralForCausalLM(hf.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                                   sliding_window=1000)).eval()
    config = default_config(model, context_tokens=2000)
    assert config.device_budget_bytes >= kv_bytes(model, 1000) > kv_bytes(model, 2000) // 4
    assert TieredCache(model, config).manager.slots * config.block_tokens >= 1000


def test_a_layer_attending_another_window_than_its_config_is_refused():
    model = tiny_model("mistral-window")
    cache = TieredCache(model, tiered_config(model))
    model.config.sliding_window = WINDOW + 3  # the modules now ask for a window the cache did not read
    try:
        with pytest.raises(UnsupportedModelError, match="sliding_window=16"):
            model(ids(1, 5), past_key_values=cache)
    finally:
        model.config.sliding_window = WINDOW


# ---------------------------------------------------------------- refusals


def test_refused_families_name_the_reason():
    gptj = hf.GPTJForCausalLM(hf.GPTJConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=50, rotary_dim=8))
    with pytest.raises(UnsupportedModelError, match="computes attention inline"):
        TieredCache(gptj)
    for config, reason in ((hf.Gemma3Config(), "Gemma3ForCausalLM"), (hf.Llama4Config(), "Llama4ForCausalLM"),
                           (hf.Gemma2Config(use_bidirectional_attention=True), "bidirectional"),
                           (hf.BertConfig(), "model type 'bert'")):
        with pytest.raises(UnsupportedModelError, match=reason):
            TieredCache(types.SimpleNamespace(config=config))
    model = tiny_model("llama").train()
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    with pytest.raises(UnsupportedModelError, match="model.eval"):
        model(ids(1, 4), past_key_values=TieredCache(model, tiered_config(model)))
