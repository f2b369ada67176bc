"""The compatibility matrix: every supported family x every ``generate`` mode, TieredCache against
DynamicCache on the same tiny random model and inputs (``helpers``), at full retrieval budget,
with a device that holds a few blocks per row, so blocks move between device and host in every
cell.

fp32 cells: the same tokens, and logits (or scores) within 1e-4. bf16 and fp16 cells feed the
same tokens (a padded batch, then decode steps) and check every attention call: TieredCache's
output stays within twice the model's own half-precision noise (eager attention in that dtype)
of the exact attention over the same inputs.

The default run covers every family and every mode (``DEFAULT_CELLS``); the other cells are
``slow``: ``pytest -m slow tests/test_generate_matrix.py`` runs them, ``-m 'not gpu'`` everything.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import DynamicCache

from tiercache.hf.cache import ATTN_NAME, TieredCache
from helpers import FAMILIES, kv_came_from_host, tiered_config, tiny_model

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
    assert kv_came_from_host(stats) and stats.moved_bytes["device->host"] > 0
    assert model.config._attn_implementation != "tiercache"
    # The cache holds what DynamicCache holds: crops undone, beams reordered.
    assert cache.get_seq_length() == ref[-1].past_key_values.get_seq_length()
    if mode == "beam":  # beams forked: rows shared an open block, which was copied
        assert stats.moved_bytes["device->device"] > 0


HALF_DEFAULT = {("mistral-window", torch.bfloat16), ("gemma2", torch.float16), ("llama4", torch.bfloat16)}


def exact_and_eager(query, keys, values, allowed, scaling, softcap):
    """One layer's attention over the same half-precision inputs two ways: exactly (fp32 math, the
    truth both implementations round) and as transformers' eager attention computes it in the
    inputs' dtype (scores and weights rounded to it; the model's own half-precision noise).
    ``allowed`` ``(rows, q_len, keys)``: which keys each query may attend."""
    group = query.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    bias = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, float("-inf"))[:, None]
    outs = []
    for dtype in (torch.float32, query.dtype):
        scores = torch.matmul(query.to(dtype), k.to(dtype).transpose(2, 3)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        weights = torch.softmax(scores + bias.to(dtype), dim=-1, dtype=torch.float32).to(dtype)
        outs.append(torch.matmul(weights, v.to(dtype)).float())
    return outs


def allowed_keys(window, past: int, new: int, valid: torch.Tensor) -> torch.Tensor:
    """``(rows, new, past + new)``: causal, real keys only, within the layer's window (sliding:
    the last ``tokens`` positions; chunked: the query's chunk, counted from the row's first real
    token, as transformers' masks count them)."""
    q = torch.arange(past, past + new)[None, :, None]
    k = torch.arange(past + new)[None, None, :]
    ok = (k <= q) & valid[:, None, :]
    if window is not None and window.kind == "sliding":
        ok &= k > q - window.tokens
    elif window is not None:
        pad = (valid.cumsum(1) == 0).sum(1)[:, None, None]
        ok &= torch.div(k - pad, window.tokens, rounding_mode="floor") == torch.div(q - pad, window.tokens,
                                                                                   rounding_mode="floor")
    return ok


@pytest.mark.parametrize("family, dtype", [
    pytest.param(f, d, marks=() if (f, d) in HALF_DEFAULT else pytest.mark.slow, id=f"{f}-{str(d)[6:]}")
    for f in FAMILIES for d in (torch.bfloat16, torch.float16)])
def test_half_precision_stays_within_the_models_own_noise(family, dtype, monkeypatch):
    """bf16 / fp16: at every attention call of a padded 2-row prompt and 10 teacher-forced decode
    steps, TieredCache's output differs from the exact (fp32) attention over the very same
    half-precision query, keys and values by at most twice what transformers' eager attention
    in that dtype differs by. Compared call by call, on identical inputs: logits compared at the
    end of the model would also carry whatever the model amplifies (a mixture-of-experts router
    that flips on one rounding, as Llama 4's did on some CPUs), which is not tiercache's doing."""
    from transformers import AttentionInterface

    from tiercache.hf.families import model_spec

    model = model_of(family, dtype)
    windows = model_spec(model).windows
    own = AttentionInterface._global_mapping[ATTN_NAME]
    seen = {}  # layer -> (keys, values, valid) of every token so far
    worst = []

    def checked(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
        out, weights = own(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap, **kwargs)
        layer, new = module.layer_idx, key.shape[2]
        keys, values, _ = seen.get(layer, (key[:, :, :0], value[:, :, :0], None))
        keys, values = torch.cat([keys, key], 2), torch.cat([values, value], 2)
        valid = attention_mask.bool()[:, -keys.shape[2]:]
        seen[layer] = (keys, values, valid)
        allowed = allowed_keys(windows[layer], keys.shape[2] - new, new, valid)
        exact, eager = exact_and_eager(query, keys, values, allowed,
                                       module.scaling if scaling is None else scaling, softcap)
        real = valid[:, -new:]  # padding queries attend nothing real: not compared
        got = out.transpose(1, 2).float()
        worst.append(((got - exact).abs().amax((1, 3))[real].max(), (eager - exact).abs().amax((1, 3))[real].max()))
        return out, weights

    monkeypatch.setitem(AttentionInterface._global_mapping, ATTN_NAME, checked)
    ids, mask = padded_batch()
    ids, mask = ids[:2], mask[:2]
    cache = TieredCache(model, tiered_config(model, rows=2))
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
        for token in prompt(2, seed=8)[:, :10].T:
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            model(token[:, None], attention_mask=mask, past_key_values=cache)
    assert len(worst) == 11 * len(windows)
    assert kv_came_from_host(cache.manager.stats())
    for call, (error, noise) in enumerate(worst):
        assert noise > 0 and error <= 2 * noise, (call, float(error), float(noise))
