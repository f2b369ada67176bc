"""Measuring retrieval on real data: capture a model's queries and keys, and score selections by
recall of attention mass.

An attention function registered under ``"tiercache_capture"`` runs the model's usual SDPA
attention and records, per layer, the queries of the last positions and the whole key cache.
Both are post-RoPE: transformers rotates queries and keys before the cache update, so these are
exactly the vectors decode attention compares.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_NAME = "tiercache_capture"


@dataclass
class Capture:
    """Queries and keys of one sequence, per layer.

    - ``queries[layer]``: ``(steps, q_heads, head_dim)``, one row per step (a prefill position among
      the last ones, then one per greedy decode step), in order.
    - ``positions``: ``(steps,)`` absolute position of each step's query; step ``s`` attends to
      keys ``[0, positions[s]]`` (causal).
    - ``keys[layer]``: ``(kv_heads, tokens, head_dim)``, the full post-RoPE key cache at the end.
    - ``scaling``: the softmax scale of the attention (``head_dim ** -0.5`` for Llama-family models).
    """

    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    positions: torch.Tensor
    scaling: float

    @property
    def steps(self) -> int:
        return int(self.positions.numel())


@contextmanager
def recording_attention(model, record: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], None]):
    """Within the block, every attention call of ``model`` first calls ``record(module, query,
    key)`` (post-RoPE, ``(batch, heads, tokens, head_dim)``), then runs transformers' SDPA."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def attend(module, query, key, value, attention_mask, **kwargs):
        record(module, query, key)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_NAME, attend)
    AttentionMaskInterface.register(_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def capture(model, input_ids: list[int], last_positions: int, decode_steps: int) -> Capture:
    """Run ``model`` over ``input_ids`` then ``decode_steps`` greedy steps, recording queries of the
    last ``last_positions`` prompt positions and of every decode step, and the final key cache."""
    from transformers import DynamicCache

    n_layers = model.config.num_hidden_layers
    queries: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    keys: list[torch.Tensor | None] = [None] * n_layers
    scaling: list[float] = []

    def record(module, query, key):
        layer = module.layer_idx
        take = min(query.shape[2], last_positions) if query.shape[2] > 1 else 1
        queries[layer].append(query[0, :, -take:].transpose(0, 1).detach().clone())
        keys[layer] = key[0].detach()
        scaling.append(module.scaling)

    with recording_attention(model, record), torch.no_grad():
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([input_ids])
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(decode_steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
    n = len(input_ids)
    positions = torch.arange(n - min(n, last_positions), n + decode_steps)
    return Capture(
        queries=[torch.cat(q, dim=0) for q in queries],
        keys=[k.clone() for k in keys],
        positions=positions,
        scaling=scaling[0],
    )


def attention_probs(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """True attention weights of ``queries`` ``(q_heads, head_dim)`` over ``keys`` ``(kv_heads,
    tokens, head_dim)`` (the whole causal context): ``(q_heads, tokens)``, rows summing to 1."""
    kv_heads, tokens, head_dim = keys.shape
    logits = torch.einsum("hgd,htd->hgt", queries.reshape(kv_heads, -1, head_dim).float(), keys.float())
    return torch.softmax(logits * scaling, dim=-1).reshape(-1, tokens)


def mass_recall(probs: torch.Tensor, blocks: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """Recall of attention mass per query head: the share of ``probs`` ``(q_heads, tokens)``
    (``attention_probs``) that falls in the tokens of ``blocks`` (block indices, every head reads
    them all) of ``block_tokens`` tokens. Returns ``(q_heads,)`` in [0, 1]."""
    tokens = probs.shape[1]
    inside = torch.zeros(-(-tokens // block_tokens), dtype=torch.bool, device=probs.device)
    inside[blocks] = True
    return (probs * inside.repeat_interleave(block_tokens)[:tokens]).sum(-1)
