"""``ContextStore``: documents' KV caches under content keys, encoded once and loaded in this or
any later process instead of recomputing the prefill (CacheGen / LMCache style).

``encode(document) -> key`` (``content_key`` of the model's fingerprint and the token ids;
nothing is recomputed when the key is stored already) and ``load(key) -> TieredCache``. Records
live in a ``ContextBackend`` (``tiercache.contexts.backends``): a ``DiskStore`` directory
(persistent index, checksums on every read, single writer, least recently used contexts evicted
when full) or a Redis server (``tiercache.io.redis_store``); beside them, what was measured at
encode time (``ContextInfo``: tokens, prefill seconds, bytes, fingerprint). ``prefill`` is the
chunked full-attention prefill that encoding runs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch

from ..blocks import BlockLayout
from ..config import RetrievalConfig, TierConfig
from ..errors import ConfigError, ShapeError
from ..fingerprint import model_fingerprint, model_id, storage_fingerprint
from ..hf.cache import TieredCache, default_config
from ..io.codec import make_codec
from ..spec import config_spec
from .backends import open_contexts
from .kv import CHUNK_TOKENS, content_key, load_kv_context, save_kv_context

#: Tokens per forward when encoding a document (bounds the score tensors of the prefill).
_PREFILL_CHUNK = 512
#: Tokens a default config leaves beyond a document for a question and its answer.
_ROOM_TOKENS = 512


@dataclass(frozen=True)
class ContextInfo:
    """What ``ContextStore.encode`` measured for one context: ``tokens``, ``prefill_seconds`` (the
    prefill it saves each later use), ``raw_bytes`` of KV and ``stored_bytes`` in the store, and
    the ``fingerprint`` of the KV (``Fingerprint.to_json()``)."""

    key: str
    tokens: int
    prefill_seconds: float
    raw_bytes: int
    stored_bytes: int
    codec: str
    fingerprint: dict = field(default_factory=dict)


def prefill(model, config: TierConfig, ids: list[int]) -> TieredCache:
    """A ``TieredCache`` holding ``ids`` prefilled with full attention, ``_PREFILL_CHUNK``
    tokens per forward (exact; the device never holds more than ``config``'s budget)."""
    cache = TieredCache(model, config, prefill="full")
    device = next(model.parameters()).device
    try:
        with torch.no_grad():  # TieredCache's forwards run on its attention (hf.attention.attach)
            for a in range(0, len(ids), _PREFILL_CHUNK):
                model(torch.tensor([ids[a : a + _PREFILL_CHUNK]], device=device), past_key_values=cache,
                      use_cache=True)
    except BaseException:
        cache.close()
        raise
    cache.prefill = "retrieval"
    return cache


class ContextStore:
    """Documents' KV caches under content keys, in a local directory or a shared Redis server.

    ``where``: a directory (a ``DiskStore``, created; one writer at a time) or a Redis address
    (``"redis://host:port/db"``: shared by every process and machine that can reach it).
    ``codec`` / ``codec_params``: the encoding of stored KV (``"cachegen"``, ``"quant"``,
    ``"zstd"`` (lossless), ``"raw"``). ``config``: the tiers a context is prefilled and loaded
    into (default: ``default_config`` sized for the document plus ``_ROOM_TOKENS`` of question and
    answer; a disk tier, if any, must live elsewhere). ``retrieval``: the retrieval settings of
    that default config. ``budget_bytes``: bytes a directory store may hold (older contexts are
    evicted, least recently used first; a Redis server's own ``maxmemory`` bounds it there).
    ``max_tokens``: longest document accepted.

    Keys are ``content_key(fingerprint.digest, token ids)``: ``fingerprint`` covers the model's
    config, weights and dtype, the KV layout, the codec and the record format, so another model
    or setting never finds these contexts, and loading one it names anyway is refused.
    """

    def __init__(self, where: str | os.PathLike, model, tokenizer, codec: str = "cachegen", *,
                 codec_params: dict | None = None, config: TierConfig | None = None,
                 retrieval: RetrievalConfig | None = None,
                 budget_bytes: int = 16 << 30, max_tokens: int = 32768) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        self.where = where
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id(model)
        self.codec_name = codec
        self.codec = make_codec(codec, **(codec_params or {}))
        self.config = config
        self.retrieval = retrieval
        self.max_tokens = max_tokens
        spec = config_spec(model.config)
        layout = BlockLayout(spec.kv_heads, CHUNK_TOKENS, spec.head_dim, model.dtype)
        self.fingerprint = storage_fingerprint(model_fingerprint(model), spec.layers, layout, self.codec)
        self.backend = open_contexts(where, budget_bytes)
        #: Contexts found already stored by ``encode`` / encoded anew, since this store opened,
        #: and the seconds those prefills took.
        self.hits = 0
        self.misses = 0
        self.prefill_seconds = 0.0

    def tokens(self, document: str) -> list[int]:
        """Token ids of ``document``; ``ShapeError`` if empty or longer than ``max_tokens``."""
        if not isinstance(document, str) or not document.strip():
            raise ShapeError("the document is empty")
        ids = self.tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_tokens:
            raise ShapeError(f"the document has {len(ids)} tokens, more than max_tokens={self.max_tokens}")
        return ids

    def key(self, document: str) -> str:
        """The content key ``document`` is stored under (this store's fingerprint and its token ids)."""
        return content_key(self.fingerprint.digest, self.tokens(document))

    def encode(self, document: str, force: bool = False) -> str:
        """Store the KV of ``document`` (prefilled with full attention, in chunks) unless it is
        stored already (``force``: store it again, e.g. after a load found it evicted); return
        its key."""
        ids = self.tokens(document)
        key = content_key(self.fingerprint.digest, ids)
        if not force and self.backend.has_context(key):
            self.hits += 1
            return key
        self.misses += 1
        start = time.perf_counter()
        cache = prefill(self.model, self._config(len(ids)), ids)
        prefill_seconds = time.perf_counter() - start
        self.prefill_seconds += prefill_seconds
        try:
            kv = cache.export_kv()
        finally:
            cache.close()
        stored = save_kv_context(self.backend, key, kv, self.codec, self.fingerprint, CHUNK_TOKENS)
        info = ContextInfo(key, len(ids), prefill_seconds, kv.numel() * kv.element_size(), stored,
                           self.codec_name, self.fingerprint.to_json())
        self.backend.put_context_meta(key, vars(info))
        return key

    def load(self, key: str) -> TieredCache:
        """A fresh ``TieredCache`` holding context ``key`` (imported, no prefill); the caller
        closes it. ``BlockNotFoundError`` if the store does not hold ``key`` whole,
        ``FingerprintError`` if it holds KV of another model or setting under it."""
        kv = load_kv_context(self.backend, key, self.fingerprint)
        cache = TieredCache(self.model, self._config(kv.shape[3]), prefill="retrieval")
        try:
            cache.import_kv(kv.to(cache.layout.dtype))
        except BaseException:
            cache.close()
            raise
        return cache

    def info(self, key: str) -> ContextInfo | None:
        """What was measured when ``key`` was encoded (None if not known to this store)."""
        meta = self.backend.context_meta(key)
        try:
            return ContextInfo(**meta) if meta is not None else None
        except TypeError:  # written by another version: a description only
            return None

    def close(self) -> None:
        """Release the store (a directory's writer lock, a server's connections)."""
        self.backend.close()

    def __enter__(self) -> "ContextStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _config(self, tokens: int) -> TierConfig:
        if self.config is not None:
            return self.config
        config = default_config(self.model, context_tokens=tokens + _ROOM_TOKENS)
        # The tiers' device is the model's (default_config would pick CUDA whenever present).
        config = dataclasses.replace(config, device=next(self.model.parameters()).device)
        return dataclasses.replace(config, retrieval=self.retrieval) if self.retrieval else config
