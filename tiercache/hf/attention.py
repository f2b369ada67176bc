"""The ``"tiercache"`` attention function, registered with transformers, and switching a model to
it only for the forwards that use a TieredCache.

transformers calls ``Cache.update(key, value, layer_idx)`` and then the model's attention
function with the query; ``update`` never sees the query, so TieredCache's work happens in the
attention function. The mask interface entry of ``"tiercache"`` passes the 2-D padding mask
through unchanged (causality and windows are the attention's job), so ``get_mask_sizes`` of
every mask kind is the whole cache.

**Switching.** ``attach(model, cache_type)`` installs, once per model, a forward pre-hook and an
always-called forward hook on the model's base (decoder) module. A forward given a
``cache_type`` cache (as ``past_key_values``, or ``cache`` from transformers 5.24 on) runs with
every attention config of the model set to ``"tiercache"``; the hook puts back what each had
when the forward ends (or raises), so the model keeps its own implementation (``"sdpa"``, ``"eager"``, ...) for every other cache and
never sees ``"tiercache"`` outside such a forward. The switch is per forward, not per thread:
do not run one model from two threads at once with different caches.
"""

from __future__ import annotations

import threading
import weakref

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PretrainedConfig
from transformers.masking_utils import prepare_padding_mask

from ..errors import UnsupportedModelError

ATTN_NAME = "tiercache"

_active = threading.local()


def note_update(cache) -> None:
    """``cache`` has just received a layer's keys: its attention function call comes next."""
    _active.cache = weakref.ref(cache)


def attach(model, cache_type: type) -> None:
    """Let ``model``'s forwards with a ``cache_type`` cache run on the ``"tiercache"`` attention
    (module docstring). Idempotent."""
    base = getattr(model, "base_model", model)
    if getattr(base, "_tiercache_switch", False):
        return
    configs = {id(c): c for c in (getattr(m, "config", None) for m in (model, *base.modules()))
               if isinstance(c, PretrainedConfig)}
    saved: list[list | None] = []  # a stack: a forward may run inside another one

    def before(module, args, kwargs):
        # Found by type, not by name: transformers 5.24 renamed ``past_key_values`` to ``cache``.
        if any(isinstance(a, cache_type) for a in (*kwargs.values(), *args)):
            saved.append([(c, c._attn_implementation_internal) for c in configs.values()])
            for c in configs.values():
                c._attn_implementation_internal = ATTN_NAME
        else:
            saved.append(None)

    def after(module, args, kwargs, output):
        state = saved.pop() if saved else None
        for c, name in state or ():
            c._attn_implementation_internal = name

    base.register_forward_pre_hook(before, with_kwargs=True)
    base.register_forward_hook(after, with_kwargs=True, always_call=True)
    base._tiercache_switch = True


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, use_vmap=False, **kwargs):
    """The ``"tiercache"`` entry of transformers' mask interface: the 2-D padding mask ``(batch,
    kv_length)`` as given (True: a real token), or None. A custom mask function (image tokens
    attending each other, ...) arrives with ``use_vmap``: refused, it cannot be honoured."""
    if use_vmap:
        raise UnsupportedModelError("this forward combines the causal mask with a custom mask function (e.g. "
                                    "bidirectional image tokens); the tiercache attention attends causally only")
    return prepare_padding_mask(attention_mask, kv_length, kv_offset)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
               sliding_window=None, **kwargs):
    """The ``"tiercache"`` attention function: TieredCache's attention when the cache that just
    received this layer's keys is one (the normal case: ``attach`` switches to it only then),
    plain causal attention over ``key`` / ``value`` otherwise (a model switched by hand)."""
    if dropout:
        raise UnsupportedModelError(f"attention dropout {dropout} (a model in training mode): tiercache is for "
                                    "inference; call model.eval()")
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(f"attention with {name} (learned attention sinks) is not supported")
    ref = getattr(_active, "cache", None)
    cache = ref() if ref is not None else None
    scaling = module.scaling if scaling is None else scaling
    layer = module.layer_idx
    if cache is not None and cache.received(layer, key):
        cache.check_layer(layer, sliding_window, softcap)
        return cache.attend(layer, query, key, value, attention_mask, scaling), None
    if softcap is not None or sliding_window is not None:
        raise UnsupportedModelError(f"layer {layer}: the tiercache attention without a TieredCache attends plainly "
                                    "causally, not with soft-capping or a sliding window; leave the model on its own "
                                    "attention implementation (TieredCache switches it for its own forwards)")
    return _causal_attention(query, key, value, attention_mask, scaling), None


def _causal_attention(query, key, value, attention_mask, scaling):
    """Causal SDPA with the queries aligned to the last keys (they follow any cached ones), and
    the 2-D padding mask if given."""
    q_len, k_len = query.shape[2], key.shape[2]
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if attention_mask is not None:
        # A padding query sees no real key; letting it see itself keeps its row free of NaN.
        own = mask & ~torch.ones_like(mask).tril(k_len - q_len - 1)
        mask = (mask & attention_mask[:, None, None, -k_len:].to(torch.bool)) | own
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2)


AttentionInterface.register(ATTN_NAME, _attention)
AttentionMaskInterface.register(ATTN_NAME, _padding_mask)
