"""Which transformers models ``TieredCache`` can take over, and how each of their layers attends.

TieredCache replaces a model's attention function (transformers' ``AttentionInterface``), so a
family works when (1) every attention module hands its post-projection keys and values to
``Cache.update`` and then calls the registered attention function with the query (its own
scaling, soft-capping and window passed as arguments), and (2) whatever encodes positions in the
keys happens before the cache (RoPE applied before ``update``, or absolute positions added to the
embeddings), so cached keys are final and a subset of blocks needs no re-rotation. What the
families do differently, and where it is handled:

- **Query scaling** (Gemma2/3 ``query_pre_attn_scalar``, Granite ``attention_multiplier``, GPT-2's
  optional per-layer scaling): the module passes ``scaling``; the attention uses it.
- **Soft-capping** (Gemma2 ``attn_logit_softcapping``): the module passes ``softcap``; scores
  become ``softcap * tanh(score / softcap)`` before the mask (``kernels.attention``). Gemma3's
  modules pass none, so none is applied (as transformers does).
- **QK norm** (Gemma3, OLMo2, Llama 4's L2 norm), **partial RoPE** (Phi3), **no-RoPE layers**
  (SmolLM3, Llama 4): all act on the keys before ``update``; nothing to do. Llama 4's query
  temperature on its no-RoPE layers reads ``get_seq_length(layer)``, which the cache keeps per
  layer.
- **Windows** (``layer_types``): ``"sliding_attention"`` layers attend exactly their last
  ``sliding_window`` positions (Mistral, Qwen2/Qwen3 with ``use_sliding_window``, Gemma2/3's
  alternating layers, Phi3 and SmolLM3 when set); ``"chunked_attention"`` layers (Llama 4)
  attend their ``attention_chunk_size`` chunk, counted from each row's first real token as
  transformers' mask does. Positions count padding, as in transformers' masks.
- **No RoPE at all** (GPT-2): learned absolute positions are added to the embeddings before the
  first layer, so its keys are as final as post-RoPE keys.

Refused, with the reason: GPT-J (``GPTJAttention`` computes attention inline instead of calling
the attention interface, so nothing can take it over; its RoPE is applied before the cache, so
that is not the obstacle), bidirectional configurations, multimodal Gemma 3 (image tokens attend
each other through a custom mask function), and every family not listed below.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..spec import ModelSpec, Window, kv_geometry

#: Model types whose attention TieredCache takes over, with what they need (module docstring).
SUPPORTED_MODEL_TYPES = {
    "llama": "RoPE before the cache",
    "mistral": "RoPE before the cache; every layer sliding when sliding_window is set",
    "qwen2": "RoPE before the cache; sliding layers with use_sliding_window",
    "qwen3": "QK norm and RoPE before the cache; sliding layers with use_sliding_window",
    "gemma": "RoPE before the cache",
    "gemma2": "attention soft-capping, query_pre_attn_scalar, alternating sliding layers",
    "gemma3_text": "QK norm, query_pre_attn_scalar, alternating sliding layers with their own RoPE",
    "phi3": "fused QKV, partial RoPE before the cache; sliding when sliding_window is set",
    "olmo2": "QK norm before RoPE, both before the cache",
    "granite": "attention_multiplier as the query scaling",
    "smollm3": "no-RoPE layers (keys cached as they are)",
    "llama4_text": "chunked attention on RoPE layers, no-RoPE full layers with query temperature",
    "gpt2": "no RoPE: learned absolute positions at the input",
}

#: Model types refused with a reason beyond "not supported".
REFUSED_MODEL_TYPES = {
    "gptj": "GPTJAttention computes attention inline (its _attn) instead of calling transformers' attention "
            "interface, so no cache can take its attention over (its RoPE is applied before the cache; "
            "that is not the obstacle)",
    "gemma3": "multimodal Gemma 3 lets image tokens attend each other through a custom mask function; load "
              "the text model with Gemma3ForCausalLM",
    "llama4": "multimodal Llama 4; load the text model with Llama4ForCausalLM",
}

_SOFTCAPPED = ("gemma2",)
_WINDOW_KINDS = {"sliding_attention": "sliding", "chunked_attention": "chunked"}


def model_spec(model) -> ModelSpec:
    """The ``ModelSpec`` of ``model`` (a transformers causal LM), or ``UnsupportedModelError``
    naming why tiercache cannot take over its attention."""
    mcfg = getattr(model, "config", None)
    model_type = getattr(mcfg, "model_type", None)
    if model_type in REFUSED_MODEL_TYPES:
        raise UnsupportedModelError(f"model type {model_type!r} is not supported: {REFUSED_MODEL_TYPES[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"tiercache cannot take over the attention of model type {model_type!r}; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (attention through transformers' attention interface, with "
            "positions encoded in the keys before the cache)")
    if getattr(mcfg, "use_bidirectional_attention", False) or not getattr(mcfg, "is_causal", True):
        raise UnsupportedModelError(f"{model_type} with bidirectional attention is not supported: the cache "
                                    "attends causally")
    # Only Gemma 2's modules pass their config's soft-capping to the attention (Gemma 3's have the
    # setting and do not); the attention function checks what each module passes against this.
    softcap = mcfg.attn_logit_softcapping if model_type in _SOFTCAPPED else None
    return ModelSpec(model_type, *kv_geometry(mcfg), _windows(mcfg), softcap)


def _windows(mcfg) -> tuple[Window | None, ...]:
    """Each layer's window from ``layer_types``, inferred as transformers' caches infer it when a
    config has none (a set ``sliding_window``: every layer slides; ``attention_chunk_size``: every
    layer is chunked)."""
    n = mcfg.num_hidden_layers
    types = getattr(mcfg, "layer_types", None)
    if types is None:
        kind = ("sliding_attention" if getattr(mcfg, "sliding_window", None) is not None else
                "chunked_attention" if getattr(mcfg, "attention_chunk_size", None) is not None else "full_attention")
        types = [kind] * n
    windows = []
    for layer, kind in enumerate(types[:n]):
        if kind == "full_attention":
            windows.append(None)
        elif kind in _WINDOW_KINDS:
            size = mcfg.sliding_window if kind == "sliding_attention" else mcfg.attention_chunk_size
            if not isinstance(size, int) or size < 1:
                raise UnsupportedModelError(f"layer {layer} is {kind} with a window of {size!r} tokens")
            windows.append(Window(_WINDOW_KINDS[kind], size))
        else:
            raise UnsupportedModelError(f"layer {layer} is of type {kind!r}; tiercache attends full, sliding and "
                                        "chunked attention layers only")
    return tuple(windows)
