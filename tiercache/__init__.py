"""tiercache: a tiered KV-cache memory manager for long-context LLM inference on one GPU.

Hot KV blocks live on the compute device, warm ones in (pinned) host memory, cold ones on disk;
block retrieval picks, at each decode step, the blocks the attention must read.
"""

from .blocks import BlockKey, BlockLayout, BlockMeta, TierName
from .config import RetrievalConfig, TierConfig
from .errors import (
    BlockNotFoundError,
    CapacityError,
    ConfigError,
    CorruptBlockError,
    PinnedBlockError,
    ShapeError,
    StoreError,
    TiercacheError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "BlockKey",
    "BlockLayout",
    "BlockMeta",
    "BlockNotFoundError",
    "CapacityError",
    "ConfigError",
    "CorruptBlockError",
    "PinnedBlockError",
    "RetrievalConfig",
    "ShapeError",
    "StoreError",
    "TierConfig",
    "TierName",
    "TiercacheError",
    "UnsupportedModelError",
]
