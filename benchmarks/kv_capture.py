"""Real KV data for codec tests and benchmarks: every layer's keys, values and last queries of
SmolLM2-135M-Instruct over the reference text.

Keys and values come from the ``DynamicCache`` a forward pass fills (post-RoPE, as the tiers store
them). Queries are captured by an attention function registered for the duration of the pass that
records each layer's post-RoPE query and then runs transformers' own SDPA attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiercache.corpus import text_tokens
from tiercache.retrieval.evaluate import recording_attention


@dataclass(frozen=True)
class CapturedKV:
    """One forward pass's cache.

    ``keys[i]`` / ``values[i]``: layer ``i``'s ``(kv_heads, tokens, head_dim)`` tensors;
    ``queries[i]``: layer ``i``'s ``(heads, n_queries, head_dim)`` post-RoPE queries of the last
    ``n_queries`` positions; ``scaling``: the softmax scale the model uses.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor]
    scaling: float

    @property
    def tokens(self) -> int:
        return self.keys[0].shape[1]


@torch.no_grad()
def capture_kv(model, token_ids: list[int], n_queries: int = 32, layers: int | None = None) -> CapturedKV:
    """Run ``model`` over ``token_ids`` and return its cache and last ``n_queries`` queries.

    ``layers`` keeps only the first that many layers (the forward pass still runs them all).
    """
    store: dict[int, torch.Tensor] = {}
    ids = torch.tensor([token_ids])
    def record(module, query, key, value):
        store[module.layer_idx] = query[0, :, -n_queries:, :].detach().clone()

    with recording_attention(model, record):
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    n_layers = len(cache.layers) if layers is None else layers
    keys = [cache.layers[i].keys[0].clone() for i in range(n_layers)]
    values = [cache.layers[i].values[0].clone() for i in range(n_layers)]
    queries = [store[i] for i in range(n_layers)]
    scaling = model.model.layers[0].self_attn.scaling
    return CapturedKV(keys, values, queries, float(scaling))


def capture_reference_kv(
    n_tokens: int,
    offset_tokens: int = 0,
    n_queries: int = 32,
    layers: int | None = None,
    model_and_tokenizer=None,
) -> CapturedKV:
    """``capture_kv`` of the default model over ``n_tokens`` tokens of the reference text."""
    if model_and_tokenizer is None:
        from tiercache.models import load_default_model

        model_and_tokenizer = load_default_model()
    model, tokenizer = model_and_tokenizer
    return capture_kv(model, text_tokens(tokenizer, n_tokens, offset_tokens), n_queries, layers)


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal softmax attention of the last ``q.shape[1]`` positions over ``k``/``v``.

    ``q``: ``(heads, n_q, head_dim)``; ``k``, ``v``: ``(kv_heads, tokens, head_dim)`` (GQA: heads
    share KV heads in contiguous groups). Computed in fp32; returns ``(heads, n_q, head_dim)``.
    """
    heads, n_q, _ = q.shape
    group = heads // k.shape[0]
    kf = k.float().repeat_interleave(group, dim=0)
    vf = v.float().repeat_interleave(group, dim=0)
    scores = torch.einsum("hqd,htd->hqt", q.float(), kf) * scaling
    tokens = k.shape[1]
    positions = torch.arange(tokens - n_q, tokens)
    scores = scores.masked_fill(torch.arange(tokens)[None, :] > positions[:, None], float("-inf"))
    return torch.einsum("hqt,htd->hqd", scores.softmax(dim=-1), vf)
