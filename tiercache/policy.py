"""Eviction policies: which blocks of a tier leave first when it must make room.

A policy tracks the evictable blocks of one tier (the manager never hands it pinned blocks) and
names victims on demand. ``LRUPolicy`` evicts the least recently used; ``ScorePolicy`` evicts the
blocks retrieval has chosen least (a decayed count of selections), so blocks that the selector
keeps picking stay hot even when a burst of other blocks passes through.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Iterable

from .blocks import BlockKey
from .errors import CapacityError, ConfigError


class Policy(ABC):
    """Chooses eviction victims among the blocks it tracks."""

    def __init__(self) -> None:
        # Recency order, oldest first; every policy breaks ties by it.
        self._order: OrderedDict[BlockKey, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def insert(self, key: BlockKey) -> None:
        """Start tracking ``key`` as the most recently used block."""
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: BlockKey) -> None:
        """Stop tracking ``key`` (no error if untracked)."""
        self._order.pop(key, None)

    def touch(self, key: BlockKey) -> None:
        """Mark ``key`` as just used."""
        if key in self._order:
            self._order.move_to_end(key)

    def record_selection(self, keys: Iterable[BlockKey]) -> None:
        """Tell the policy which blocks retrieval selected at this step (the score policy uses it)."""

    @abstractmethod
    def victims(self, n: int, exclude: Collection[BlockKey] = ()) -> list[BlockKey]:
        """``n`` blocks to evict, none in ``exclude``; ``CapacityError`` if fewer are evictable."""

    def _shortfall(self, n: int, found: int) -> CapacityError:
        return CapacityError(f"need {n} evictable blocks, only {found} are neither pinned nor in use")


class LRUPolicy(Policy):
    """Least recently used first."""

    def victims(self, n: int, exclude: Collection[BlockKey] = ()) -> list[BlockKey]:
        out: list[BlockKey] = []
        for key in self._order:
            if len(out) == n:
                break
            if key not in exclude:
                out.append(key)
        if len(out) < n:
            raise self._shortfall(n, len(out))
        return out


class ScorePolicy(Policy):
    """Lowest retrieval score first; a block's score is the number of steps that selected it,
    decayed by ``decay`` per step, so old popularity fades. Ties go to the least recently used."""

    def __init__(self, decay: float = 0.9) -> None:
        super().__init__()
        if not 0.0 < decay <= 1.0:
            raise ConfigError(f"score policy decay must be in (0, 1], got {decay}")
        self.decay = decay
        self._step = 0
        # key -> (score, step at which it was last updated); decayed lazily on read.
        self._scores: dict[BlockKey, tuple[float, int]] = {}

    def remove(self, key: BlockKey) -> None:
        super().remove(key)
        self._scores.pop(key, None)

    def score(self, key: BlockKey) -> float:
        """Current decayed score of ``key`` (0 for never selected)."""
        s, at = self._scores.get(key, (0.0, self._step))
        return s * self.decay ** (self._step - at)

    def record_selection(self, keys: Iterable[BlockKey]) -> None:
        self._step += 1
        for key in keys:
            if key in self._order:
                self._scores[key] = (self.score(key) + 1.0, self._step)

    def victims(self, n: int, exclude: Collection[BlockKey] = ()) -> list[BlockKey]:
        candidates = ((self.score(k), rank, k) for rank, k in enumerate(self._order) if k not in exclude)
        out = [k for _, _, k in heapq.nsmallest(n, candidates)]
        if len(out) < n:
            raise self._shortfall(n, len(out))
        return out


def make_policy(name: str) -> Policy:
    """The policy called ``name`` (``"lru"`` or ``"score"``)."""
    if name == "lru":
        return LRUPolicy()
    if name == "score":
        return ScorePolicy()
    raise ConfigError(f"unknown eviction policy {name!r}; use 'lru' or 'score'")
