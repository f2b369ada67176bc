"""The compatibility matrix: every supported family x every ``generate`` mode, TieredCache against
DynamicCache on the same tiny random model and inputs (``tiny_models``), at full retrieval budget,
with a device that holds a few blocks per row, so blocks move between device and host in every
cell.

fp32 cells: the same tokens, and logits (or scores) within 1e-4. bf16 and fp16 cells feed both
caches the same tokens (a padded batch, then decode steps) and check that TieredCache's logits stay
within twice the model's own eager-vs-SDPA difference.

The default run covers every family and every mode (``DEFAULT_CELLS``); the other cells are
``slow``: ``pytest -m slow tests/test_generate_matrix.py`` runs them, ``-m 'not gpu'`` everything.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import DynamicCache

from tiercache.cache import TieredCache
from tiny_models import FAMILIES, tiered_config, tiny_model

MODES = ("greedy", "sampling", "return_sequences", "beam", "padded", "multi_turn", "prompt_lookup", "assisted",
         "embeds", "scores")
#: Cells of the default run: each family once or more, each mode once or more, and what mixes
#: windows with beams, padding and crops.
DEFAULT_CELLS = {
    ("llama", "beam"), ("llama", "assisted"), ("mistral", "greedy"), ("mistral-window", "prompt_lookup"),
    ("qwen2-window", "padded"), ("qwen3-window", "multi_turn"), ("gemma", "embeds"), ("gemma2", "beam"),
    ("gemma3", "padded"), ("phi3", "return_sequences"), ("olmo2", "sampling"), ("granite", "scores"),
    ("smollm3", "greedy"), ("llama4", "padded"), ("gpt2", "greedy"),
}
PROMPT, NEW = 36, 12
#: Rows each mode's generate runs (beams and returned sequences are rows of the cache).
ROWS = {"return_sequences": 3, "beam": 3, "padded": 3}


@functools.cache
def model_of(family: str, dtype: torch.dtype = torch.float32, attn: str | None = None):
    return tiny_model(family, dtype, attn=attn)


@functools.cache
def assistant_of(family: str):
    return tiny_model(family, seed=1)


def prompt(rows: int = 1, seed: int = 5, pattern: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if pattern:  # a repeated 6-token motif: prompt lookup finds candidates in it
        return torch.randint(3, 128, (rows, 6), generator=g).repeat(1, PROMPT // 6)
    return torch.randint(3, 128, (rows, PROMPT), generator=g)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of 36, 22 and 9 tokens, left-padded as ``generate`` wants them."""
    ids = prompt(3)
    mask = torch.ones_like(ids)
    for row, n in enumerate((PROMPT, 22, 9)):
        ids[row, : PROMPT - n] = 0
        mask[row, : PROMPT - n] = 0
    return ids, mask


def run(family: str, mode: str, cache) -> list:
    """``generate``'s outputs for ``mode`` with ``cache`` (None: transformers' DynamicCache)."""
    model = model_of(family)
    kw = dict(max_new_tokens=NEW, return_dict_in_generate=True, output_logits=True, past_key_values=cache)
    torch.manual_seed(11)
    if mode == "greedy":
        return [model.generate(prompt(), do_sample=False, **kw)]
    if mode == "sampling":
        return [model.generate(prompt(), do_sample=True, top_k=20, **kw)]
    if mode == "return_sequences":
        return [model.generate(prompt(), do_sample=True, num_return_sequences=3, **kw)]
    if mode == "beam":
        return [model.generate(prompt(), num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True,
                               **kw)]
    if mode == "padded":
        ids, mask = padded_batch()
        return [model.generate(ids, attention_mask=mask, do_sample=False, **kw)]
    if mode == "multi_turn":
        kw["past_key_values"] = cache if cache is not None else DynamicCache(config=model.config)
        first = model.generate(prompt(), do_sample=False, **kw)
        turn = torch.cat([first.sequences, prompt(seed=6)[:, :10]], dim=1)
        return [first, model.generate(turn, do_sample=False, **kw)]
    if mode == "prompt_lookup":
        return [model.generate(prompt(pattern=True), do_sample=False, prompt_lookup_num_tokens=3, **kw)]
    if mode == "assisted":  # another random model drafts: most drafts are rejected and cropped
        return [model.generate(prompt(), do_sample=False, assistant_model=assistant_of(family), **kw)]
    if mode == "embeds":
        return [model.generate(inputs_embeds=model.get_input_embeddings()(prompt()), do_sample=False, **kw)]
    if mode == "scores":
        return [model.generate(prompt(), do_sample=True, temperature=0.7, top_p=0.9, output_scores=True, **kw)]
    raise AssertionError(mode)


def assert_same(ref, got) -> None:
    assert torch.equal(got.sequences, ref.sequences)
    for name in ("logits", "scores"):
        want, have = getattr(ref, name, None), getattr(got, name, None)
        if want is not None:
            assert len(have) == len(want)
            for a, b in zip(have, want):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if getattr(ref, "sequences_scores", None) is not None:
        torch.testing.assert_close(got.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family, mode", [
    pytest.param(f, m, marks=() if (f, m) in DEFAULT_CELLS else pytest.mark.slow) for f in FAMILIES for m in MODES])
def test_generate_matches_dynamic_cache(family, mode):
    model = model_of(family)
    ref = run(family, mode, None)
    cache = TieredCache(model, tiered_config(model, ROWS.get(mode, 1)))
    got = run(family, mode, cache)
    for a, b in zip(ref, got):
        assert_same(a, b)
    stats = cache.manager.stats()
    assert stats.device_misses > 0 and stats.moved_bytes["device->host"] > 0  # blocks moved between tiers
    assert model.config._attn_implementation != "tiercache"
    # The cache holds what DynamicCache holds: crops undone, beams reordered.
    assert cache.get_seq_length() == ref[-1].past_key_values.get_seq_length()
    if mode == "beam":  # beams forked: rows shared an open block, which was copied
        assert stats.moved_bytes["device->device"] > 0


HALF_DEFAULT = {("mistral-window", torch.bfloat16), ("gemma2", torch.float16), ("llama4", torch.bfloat16)}


@torch.no_grad()
def teacher_forced(model, cache) -> torch.Tensor:
    """Logits of a padded 2-row prompt's real positions, then of 10 decode steps with fixed tokens
    (the same for every cache, so half-precision noise cannot change what is fed), in fp32."""
    ids, mask = padded_batch()
    ids, mask = ids[:2], mask[:2]
    forced = prompt(2, seed=8)[:, :10]
    out = [model(ids, attention_mask=mask, past_key_values=cache).logits[mask.bool()]]
    for i in range(forced.shape[1]):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        out.append(model(forced[:, i : i + 1], attention_mask=mask, past_key_values=cache).logits[:, -1])
    return torch.cat(out).float()


@pytest.mark.parametrize("family, dtype", [
    pytest.param(f, d, marks=() if (f, d) in HALF_DEFAULT else pytest.mark.slow, id=f"{f}-{str(d)[6:]}")
    for f in FAMILIES for d in (torch.bfloat16, torch.float16)])
def test_half_precision_stays_within_the_models_own_noise(family, dtype):
    """bf16 / fp16: TieredCache's logits differ from DynamicCache's (on the model's default
    attention) by at most twice what the model's eager and SDPA attention differ by. Gemma 2 has
    no SDPA path (soft-capping), so there the noise is its eager attention's own rounding: half
    precision against fp32."""
    model, eager = model_of(family, dtype), model_of(family, dtype, "eager")
    ref = teacher_forced(model, DynamicCache(config=model.config))
    got = teacher_forced(model, TieredCache(model, tiered_config(model, rows=2)))
    if model.config._attn_implementation == "eager":
        exact = model_of(family, torch.float32, "eager")
        noise = (ref - teacher_forced(exact, DynamicCache(config=exact.config))).abs().max()
    else:
        noise = (teacher_forced(eager, DynamicCache(config=eager.config)) - ref).abs().max()
    assert noise > 0
    assert (got - ref).abs().max() <= 2 * noise
