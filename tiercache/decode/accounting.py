"""``ReadCounter``: what decode steps read, counted in one place that every read path goes
through (retrieved blocks, held selections, windowed layers, full reads), in host integers so
that counting never waits for the device.

Units: tokens, summed over rows, layers and steps.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReadCounter:
    """Tokens decode steps read exactly (``read_tokens``) and tokens they could have read
    (``cached_tokens``: every cached token, per row and layer, at each step)."""

    read_tokens: int = 0
    cached_tokens: int = 0

    def count(self, rows: int, read: int, cached: int) -> None:
        """One layer's decode step over ``rows`` rows read ``read`` of its ``cached`` tokens each."""
        self.read_tokens += rows * read
        self.cached_tokens += rows * cached

    @property
    def attended_fraction(self) -> float:
        """Tokens read over tokens cached (1.0 before any decode step)."""
        return self.read_tokens / self.cached_tokens if self.cached_tokens else 1.0
