"""``ModelSpec``: a model's KV geometry and how each of its layers attends, as plain data.

Everything that sizes KV (budgets, records, fingerprints, the CLI's, tests' and benchmarks'
figures) reads it from here: ``kv_geometry`` reads a transformers config's attributes (no
transformers import), ``ModelSpec.kv_bytes_per_token`` / ``kv_bytes_per_token(model)`` give the
bytes one token's keys and values take over every layer. ``tiercache.hf.families.model_spec`` builds a ``ModelSpec`` for a model it supports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    """What a windowed layer attends: ``kind`` ``"sliding"`` (the last ``tokens`` positions, its
    own included) or ``"chunked"`` (the positions of its ``tokens``-token chunk up to its own)."""

    kind: str
    tokens: int


@dataclass(frozen=True)
class ModelSpec:
    """A model's KV geometry (``layers`` layers of ``kv_heads`` KV heads of ``head_dim`` dims, read
    by ``q_heads`` query heads); per layer, its window (None: full attention, which goes through
    retrieval); and the soft-capping of attention scores its modules ask for (None: none)."""

    model_type: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    windows: tuple[Window | None, ...] = ()
    softcap: float | None = None

    @property
    def widest_window(self) -> int:
        """Tokens of the widest window of any layer (0 without windowed layers)."""
        return max((w.tokens for w in self.windows if w is not None), default=0)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of one token's keys and values over every layer, stored in ``dtype``."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype.itemsize


def kv_geometry(config) -> tuple[int, int, int, int]:
    """``(layers, q_heads, kv_heads, head_dim)`` of a transformers model config (attributes
    only, so a config read from a checkpoint directory works without its model)."""
    q_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    return config.num_hidden_layers, q_heads, kv_heads, head_dim


def config_spec(config) -> ModelSpec:
    """The geometry of a transformers config as a ``ModelSpec`` without window or soft-capping
    information (what stored KV and its fingerprint need; ``hf.families.model_spec`` adds the rest
    for a model it supports)."""
    return ModelSpec(str(getattr(config, "model_type", "")), *kv_geometry(config))


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one token takes over every layer of ``model`` (a transformers
    model: its config's geometry, its dtype)."""
    return config_spec(model.config).kv_bytes_per_token(model.dtype)
