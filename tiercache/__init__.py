"""tiercache: a tiered KV-cache memory manager for long-context LLM inference on one GPU.

Hot KV blocks live on the compute device, warm ones in (pinned) host memory, cold ones on disk;
block retrieval picks, at each decode step, the blocks the attention must read.

Errors load with the package; everything else loads on first use (it needs torch, and
``tiercache.TieredCache`` transformers, the ``hf`` extra), so that importing a small part of
tiercache, or running ``tiercache --help``, does not import all of it.
"""

from .errors import (
    BlockNotFoundError,
    CapacityError,
    ConfigError,
    CorruptBlockError,
    FingerprintError,
    ShapeError,
    StoreError,
    StoreWarning,
    TiercacheError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

# Everything else needs torch (and TieredCache, StreamSession and ContextStore transformers): each
# is imported on first use, so that `import tiercache` (and `tiercache --help`) stays instant.
_LAZY = {
    "BlockKey": "blocks", "BlockLayout": "blocks", "TierName": "blocks",
    "RetrievalConfig": "config", "TierConfig": "config",
    "TierManager": "tiers.manager", "TierStats": "tiers.manager",
    "TieredCache": "hf.cache", "wrap": "hf.cache",
    "StreamSession": "stream", "ContextStore": "contexts.store",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'tiercache' has no attribute {name!r}")


__all__ = [
    "BlockKey",
    "BlockLayout",
    "BlockNotFoundError",
    "CapacityError",
    "ConfigError",
    "ContextStore",
    "CorruptBlockError",
    "FingerprintError",
    "RetrievalConfig",
    "ShapeError",
    "StoreError",
    "StoreWarning",
    "StreamSession",
    "TierConfig",
    "TierManager",
    "TierName",
    "TierStats",
    "TieredCache",
    "TiercacheError",
    "UnsupportedModelError",
    "wrap",
]
