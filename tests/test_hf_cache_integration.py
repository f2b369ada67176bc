"""transformers' own cache integration tests, adapted to TieredCache.

From transformers' tests/utils/test_cache_utils.py: ``test_cache_batched``,
``test_cache_beam_search`` and ``test_cache_extra_left_padding`` (CacheIntegrationTest, on
SmolLM2-135M-Instruct), ``test_static_cache_greedy_decoding_pad_left`` (eager and SDPA) and
``test_cache_copy`` (CacheHardIntegrationTest). Here they run on the embedded SmolLM2-135M-Instruct
in fp32 on the CPU, with a TieredCache whose device holds a few blocks per row (blocks move
between device and host). transformers' expected strings were recorded in fp16 on a GPU (two with
Qwen3-4B and Phi-3), so each generation is compared with DynamicCache's on the same model here;
``test_cache_batched`` also gives transformers' own strings.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from tiercache.hf.cache import TieredCache
from helpers import kv_came_from_host, tiered_config

pytestmark = pytest.mark.model


@pytest.fixture
def smollm2_left(smollm2):
    model, tok = smollm2
    side = tok.padding_side
    tok.padding_side = "left"
    yield model, tok
    tok.padding_side = side
    model.set_attn_implementation("sdpa")


def generate_both(model, inputs, rows: int, **kwargs):
    """(DynamicCache's, TieredCache's) outputs of ``generate`` on ``inputs``, and the cache."""
    kwargs = dict(do_sample=False, max_new_tokens=10, **kwargs)
    ref = model.generate(**inputs, **kwargs)
    cache = TieredCache(model, tiered_config(model, rows=rows))
    got = model.generate(**inputs, past_key_values=cache, **kwargs)
    return ref, got, cache


def test_cache_batched(smollm2_left):
    model, tok = smollm2_left
    inputs = tok(["A sequence: 1, 2, 3, 4, 5", "A sequence: A, B, C"], padding=True, return_tensors="pt")
    ref, got, cache = generate_both(model, inputs, rows=2, return_dict_in_generate=True)
    assert got.past_key_values is cache
    assert torch.equal(got.sequences, ref.sequences)
    assert tok.batch_decode(got.sequences, skip_special_tokens=True) == [
        "A sequence: 1, 2, 3, 4, 5, 6, 7, 8,", "A sequence: A, B, C, D, E, F, G, H"]
    assert kv_came_from_host(cache.manager.stats())


def test_cache_beam_search(smollm2_left):
    model, tok = smollm2_left
    inputs = tok(["Blue is"], return_tensors="pt")
    ref, got, cache = generate_both(model, inputs, rows=2, num_beams=2, num_return_sequences=2,
                                    return_dict_in_generate=True, output_scores=True)
    assert got.past_key_values is cache
    assert any(len(set(beams.tolist())) > 1 for beams in got.beam_indices)  # reorder_cache moved rows
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(got.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=1e-4)


def test_cache_extra_left_padding(smollm2_left):
    model, tok = smollm2_left
    inputs = tok(["The cat"], padding=True, return_tensors="pt")
    expanded = tok(["The cat"], padding=True, return_tensors="pt", pad_to_multiple_of=32)
    assert inputs.input_ids.shape[1] < expanded.input_ids.shape[1]
    ref, got, _ = generate_both(model, inputs, rows=1)
    assert torch.equal(got, ref)
    _, padded, _ = generate_both(model, expanded, rows=1)
    assert tok.batch_decode(padded, skip_special_tokens=True) == tok.batch_decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_decoding_pad_left(smollm2_left, attn):
    model, tok = smollm2_left
    model.set_attn_implementation(attn)
    inputs = tok(["The best color is", "We should not undermind the issues at hand"], padding=True,
                 return_tensors="pt")
    ref, got, _ = generate_both(model, inputs, rows=2)
    assert torch.equal(got, ref)
    assert model.config._attn_implementation == attn  # the model's own, again


def test_cache_copy(smollm2_left):
    """A prompt's cache filled once, then ``copy.deepcopy`` of it for each of two prompts (as in
    transformers' test, the prompt alone tokenizes differently from its start in the longer
    texts; DynamicCache gets the same treatment)."""
    model, tok = smollm2_left
    initial = tok("You are a helpful assistant. ", return_tensors="pt")
    caches = [DynamicCache(config=model.config), TieredCache(model, tiered_config(model))]
    with torch.no_grad():
        for cache in caches:
            model(**initial, past_key_values=cache)
    for prompt in ("Help me to write a blogpost about travelling.", "What is the capital of France?"):
        inputs = tok("You are a helpful assistant. " + prompt, return_tensors="pt")
        ref, got = (model.generate(**inputs, past_key_values=copy.deepcopy(cache), max_new_tokens=10,
                                   do_sample=False) for cache in caches)
        assert torch.equal(got, ref)
    assert caches[1].get_seq_length() == initial.input_ids.shape[1]
