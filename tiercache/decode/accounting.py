"""``ReadCounter``: what decode steps read, counted in one place that every read path goes
through (selected tokens, retrieved blocks, held selections, windowed layers, full reads), in
host integers so that counting never waits for the device.

A step's cost on a GPU is the bytes it touches, so besides tokens it counts three parts, per
decode step and layer, summed over rows, layers and steps: the bytes of **index** it scanned
(codes and codebooks, or block summaries), of **estimates** it read (the means that stand in for
what it does not read), and of **exact** keys and values it read; and the bytes a dense step
would have read (every cached token's keys and values).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReadCounter:
    """Decode steps' reads. ``token_bytes``: bytes of one token's keys and values, every KV head
    of one layer. Tokens and bytes are summed over rows, layers and steps."""

    token_bytes: int
    read_tokens: int = 0
    cached_tokens: int = 0
    index_bytes: int = 0
    estimate_bytes: int = 0

    def count(self, rows: int, read: int, cached: int, index_bytes: int = 0, estimate_bytes: int = 0) -> None:
        """One layer's decode step over ``rows`` rows read ``read`` of its ``cached`` tokens each
        (every KV head; with token retrieval, each head its own), after scanning
        ``index_bytes`` of index and ``estimate_bytes`` of estimates (all rows together)."""
        self.read_tokens += rows * read
        self.cached_tokens += rows * cached
        self.index_bytes += index_bytes
        self.estimate_bytes += estimate_bytes

    @property
    def exact_bytes(self) -> int:
        """Bytes of keys and values read exactly."""
        return self.read_tokens * self.token_bytes

    @property
    def dense_bytes(self) -> int:
        """Bytes dense steps would have read: every cached token's keys and values."""
        return self.cached_tokens * self.token_bytes

    @property
    def touched_bytes(self) -> int:
        """Bytes the steps touched: index, estimates and exact keys and values."""
        return self.index_bytes + self.estimate_bytes + self.exact_bytes

    @property
    def attended_fraction(self) -> float:
        """Tokens read over tokens cached (1.0 before any decode step)."""
        return self.read_tokens / self.cached_tokens if self.cached_tokens else 1.0

    @property
    def touched_fraction(self) -> float:
        """Bytes touched over a dense step's bytes (1.0 before any decode step)."""
        return self.touched_bytes / self.dense_bytes if self.cached_tokens else 1.0


@dataclass
class CacheStats:
    """A ``TieredCache``'s figures (``TieredCache.stats()``), bytes unless named otherwise.

    - ``tiers``: the tiers' counters (``TierStats``: hits, moves, waits, peaks);
    - ``read_fraction`` / ``touched_fraction``: decode steps' exact reads over cached tokens, and
      their bytes touched (index + estimates + exact) over a dense step's;
    - ``index_bytes`` / ``estimate_bytes`` / ``exact_bytes`` / ``dense_bytes``: summed over decode
      steps (``ReadCounter``);
    - ``resident``: bytes each structure holds on the device now: ``"index"`` (token codes,
      codebooks and run means, or block summaries), ``"estimates"`` (block estimates), ``"slots"``
      (the device slab), and ``"kv"``: the cached keys and values themselves, wherever they are,
      to compare with.
    """

    tiers: object
    read_fraction: float
    touched_fraction: float
    index_bytes: int
    estimate_bytes: int
    exact_bytes: int
    dense_bytes: int
    resident: dict[str, int]
