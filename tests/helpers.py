"""What tests share: tiny random decoders of every family tiercache supports, TieredCache configs
under which their blocks move between the tiers, KV sizes, and reading an answers file.

Each tiny model has 2 layers, hidden size 64, 4 query and 2 KV heads of 16 dims and a vocabulary of
128 tokens; windows are 13 tokens and Llama 4's chunks 16, so a 36-token prompt and a few
generated tokens cross them. ``initializer_range`` 0.1 makes the logits peaked enough that greedy
choices are not decided by rounding. Generation configs have no end-of-sequence token, so every
run produces all the tokens asked for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import transformers as hf

from tiercache import RetrievalConfig, TierConfig
from tiercache.spec import kv_bytes_per_token

_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, initializer_range=0.1,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
WINDOW, CHUNK = 13, 16
_SLIDING = dict(sliding_window=WINDOW)

#: name: (config class, model class, config settings beyond the common ones).
FAMILIES = {
    "llama": (hf.LlamaConfig, hf.LlamaForCausalLM, {}),
    "mistral": (hf.MistralConfig, hf.MistralForCausalLM, dict(sliding_window=None)),
    "mistral-window": (hf.MistralConfig, hf.MistralForCausalLM, _SLIDING),
    "qwen2-window": (hf.Qwen2Config, hf.Qwen2ForCausalLM, dict(use_sliding_window=True, max_window_layers=1, **_SLIDING)),
    "qwen3-window": (hf.Qwen3Config, hf.Qwen3ForCausalLM,
                     dict(use_sliding_window=True, max_window_layers=1, head_dim=16, **_SLIDING)),
    "gemma": (hf.GemmaConfig, hf.GemmaForCausalLM, dict(head_dim=16)),
    # Soft-capping at 2 (Gemma 2 uses 50) so that it changes these small scores.
    "gemma2": (hf.Gemma2Config, hf.Gemma2ForCausalLM,
               dict(head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=2.0, **_SLIDING)),
    "gemma3": (hf.Gemma3TextConfig, hf.Gemma3ForCausalLM,
               dict(head_dim=16, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"],
                    **_SLIDING)),
    "phi3": (hf.Phi3Config, hf.Phi3ForCausalLM, dict(partial_rotary_factor=0.5)),
    "olmo2": (hf.Olmo2Config, hf.Olmo2ForCausalLM, {}),
    "granite": (hf.GraniteConfig, hf.GraniteForCausalLM,
                dict(attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0)),
    # Layer 1 has no RoPE and slides.
    "smollm3": (hf.SmolLM3Config, hf.SmolLM3ForCausalLM, dict(no_rope_layers=[1, 0], use_sliding_window=True,
                                                               **_SLIDING)),
    # Layer 0: RoPE, chunked; layer 1: no RoPE, full, with the query temperature (floor_scale 8
    # so that it varies over these positions).
    "llama4": (hf.Llama4TextConfig, hf.Llama4ForCausalLM,
               dict(head_dim=16, intermediate_size_mlp=96, num_local_experts=2, num_experts_per_tok=1,
                    attention_chunk_size=CHUNK, no_rope_layers=[1, 0], floor_scale=8)),
    "gpt2": (hf.GPT2Config, hf.GPT2LMHeadModel, dict(n_layer=2, n_head=4, n_embd=64, n_positions=512)),
}
_GPT2_DROP = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings")


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, attn: str | None = None,
               **settings):
    """The tiny ``family`` model, random weights from ``seed``, in ``dtype``, on attention ``attn``
    (None: the family's default); ``settings`` override its config's (e.g. ``vocab_size``)."""
    config_class, model_class, family_settings = FAMILIES[family]
    common = {k: v for k, v in _COMMON.items() if not (family == "gpt2" and k in _GPT2_DROP)}
    torch.manual_seed(seed)
    model = model_class(config_class(**{**common, **family_settings, **settings})).eval().to(dtype)
    if attn is not None:
        model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def kv_bytes(model, tokens: int) -> int:
    """Raw KV bytes of ``tokens`` tokens of every layer of ``model``, in its dtype."""
    return kv_bytes_per_token(model) * tokens


def tiered_config(model, rows: int = 1, block: int = 4, budget: float | int = 1.0) -> TierConfig:
    """Blocks of ``block`` tokens, a 4-token sink and 8-token window, retrieval ``budget``, and a
    device that holds per layer just what ``rows`` rows need (sink, open block and one to stream
    through) plus one block: far less than the KV, so blocks move between device and host."""
    retrieval = RetrievalConfig(budget=budget, sink_tokens=4, window_tokens=8)
    slots = rows * (math.ceil(retrieval.sink_tokens / block) + 2) + 1
    return TierConfig(device_budget_bytes=kv_bytes(model, block) * slots, host_budget_bytes=1 << 24,
                      block_tokens=block, dtype=model.dtype, device="cpu", retrieval=retrieval)


def kv_came_from_host(stats) -> bool:
    """Whether reads of a cache found KV in host memory: blocks copied to the device (block
    retrieval), or tokens read in place (token retrieval)."""
    return stats.device_misses > 0 or stats.tokens_from_host > 0


def read_answers(path: Path) -> list[dict]:
    """The records of a JSON-lines answers file, in order."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer of ``vocab_size`` tokens (any text encodes) trained here on 20K
    characters of tiercache's corpus, with <pad>, <s> and </s>: a checkpoint needs one, and
    nothing is fetched from a hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tiercache.corpus import reference_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([reference_text()[:20000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def save_tiny_checkpoint(path: Path, family: str, tokenizer, **settings) -> Path:
    """``tiny_model(family, **settings)`` with ``tokenizer``'s vocabulary, saved with it in
    ``path`` (as ``save_pretrained`` does for a real checkpoint); returns ``path``."""
    model = tiny_model(family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **settings)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
