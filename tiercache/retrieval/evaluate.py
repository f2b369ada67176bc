"""Measuring retrieval on real data: capture a model's queries, keys and values, and score what a
step reads by recall of attention mass and by the error of its attention output.

An attention function registered under ``"tiercache_capture"`` runs the model's usual SDPA
attention and records, per layer, the queries of the last positions and the whole KV cache.
Queries and keys are post-RoPE: transformers rotates them before the cache update, so these are
exactly the vectors decode attention compares.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
import math
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
    - ``keys[layer]`` / ``values[layer]``: ``(kv_heads, tokens, head_dim)``, the whole KV cache at
      the end (keys post-RoPE).
    - ``scaling``: the softmax scale of the attention (``head_dim ** -0.5`` for Llama-family models).
    """

    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    scaling: float

    @property
    def steps(self) -> int:
        return int(self.positions.numel())


@contextmanager
def recording_attention(model, record: Callable[..., None]):
    """Within the block, every attention call of ``model`` first calls ``record(module, query,
    key, value)`` (post-RoPE, ``(batch, heads, tokens, head_dim)``), then runs transformers' SDPA."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def attend(module, query, key, value, attention_mask, **kwargs):
        record(module, query, key, value)
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
    values: list[torch.Tensor | None] = [None] * n_layers
    scaling: list[float] = []

    def record(module, query, key, value):
        layer = module.layer_idx
        take = min(query.shape[2], last_positions) if query.shape[2] > 1 else 1
        queries[layer].append(query[0, :, -take:].transpose(0, 1).detach().clone())
        keys[layer], values[layer] = key[0].detach(), value[0].detach()
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
        values=[v.clone() for v in values],
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


def read_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, blocks: torch.Tensor,
                   block_tokens: int, scaling: float, estimate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What a step computes when it reads ``blocks``, against full attention, per query head.

    ``queries`` ``(q_heads, D)`` attend ``keys`` / ``values`` ``(kv_heads, tokens, D)`` (every
    token precedes them); the step reads the tokens of ``blocks`` exactly and, with ``estimate``,
    every other *complete* block as its mean key with weight (its token count) and mean value
    (``tiercache.retrieval.estimate``, RetroInfer's estimation zone). Returns:

    - ``overlap`` ``(q_heads,)``: ``sum_b min(p_b, p^_b)`` over blocks, ``p`` full attention's mass
      and ``p^`` the step's; without the estimate it is the recall of attention mass;
    - ``error`` ``(q_heads,)``: ``|out^ - out| / |out|`` of the attention outputs.
    """
    kv_heads, tokens, dim = keys.shape
    group = queries.shape[0] // kv_heads
    n_blocks = -(-tokens // block_tokens)
    pad = n_blocks * block_tokens - tokens
    q = queries.double().view(kv_heads, group, dim)
    k = torch.nn.functional.pad(keys.double(), (0, 0, 0, pad)).view(kv_heads, n_blocks, block_tokens, dim)
    v = torch.nn.functional.pad(values.double(), (0, 0, 0, pad)).view(kv_heads, n_blocks, block_tokens, dim)
    real = (torch.arange(n_blocks * block_tokens) < tokens).view(n_blocks, block_tokens)
    logits = torch.einsum("hgd,hbtd->hgbt", q, k) * scaling
    logits = logits.masked_fill(~real, float("-inf"))
    probs = torch.softmax(logits.flatten(-2), -1).view_as(logits)
    full_out = torch.einsum("hgbt,hbtd->hgd", probs, v)
    read = torch.zeros(n_blocks, dtype=torch.bool)
    read[blocks] = True
    mine = logits.masked_fill(~read[:, None], float("-inf"))
    if estimate:
        whole = real.all(-1) & ~read  # the open (partial) block is always read
        centre_k, centre_v = k.mean(2), v.mean(2)                            # (h, b, d)
        est = torch.einsum("hgd,hbd->hgb", q, centre_k) * scaling + math.log(block_tokens)
        est = est.masked_fill(~whole, float("-inf"))
        weights = torch.softmax(torch.cat([mine.flatten(-2), est], -1), -1)
        exact_w = weights[..., : n_blocks * block_tokens].view_as(logits)
        est_w = weights[..., n_blocks * block_tokens :]
        out = torch.einsum("hgbt,hbtd->hgd", exact_w, v) + torch.einsum("hgb,hbd->hgd", est_w, centre_v)
        approx_mass = exact_w.sum(-1) + est_w
    else:
        exact_w = torch.softmax(mine.flatten(-2), -1).view_as(logits)
        out = torch.einsum("hgbt,hbtd->hgd", exact_w, v)
        approx_mass = exact_w.sum(-1)
    overlap = torch.minimum(probs.sum(-1), approx_mass).sum(-1)
    error = (out - full_out).norm(dim=-1) / full_out.norm(dim=-1).clamp(min=1e-12)
    return overlap.reshape(-1).float(), error.reshape(-1).float()
