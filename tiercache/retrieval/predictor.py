"""Prefetch prediction: guess a layer's next selection early enough to start moving its blocks.

The predictor holds one guess per (sequence, layer) and, when the real selection arrives, counts
how much of it the guess covered. Only the retrieved (scored) blocks are counted: sinks and the
window are known in advance without any guess.
"""

from __future__ import annotations

from .selector import Selection


class PrefetchPredictor:
    """Guesses and their hit rate.

    ``wanted``: retrieved blocks of every scored selection, summed over KV heads and calls;
    ``hits``: those of them the guess held. A selection with no guess counts as all misses.
    """

    def __init__(self) -> None:
        self._guess: dict[tuple[int, int], Selection] = {}
        self.hits = 0
        self.wanted = 0

    def guess(self, seq: int, layer: int, selection: Selection) -> None:
        """Record ``selection`` as the guess of (``seq``, ``layer``)'s next selection."""
        self._guess[(seq, layer)] = selection

    def guessed(self, seq: int, layer: int) -> Selection | None:
        """The current guess of (``seq``, ``layer``)'s next selection (what to prefetch), if any."""
        return self._guess.get((seq, layer))

    def score(self, seq: int, layer: int, actual: Selection) -> None:
        """Count how many of ``actual``'s retrieved blocks the current guess held."""
        wanted = actual.retrieved
        self.wanted += wanted.numel()
        guess = self._guess.get((seq, layer))
        if guess is not None and wanted.numel():
            known = guess.indices.to(wanted.device)
            self.hits += int((wanted.unsqueeze(-1) == known.unsqueeze(1)).any(-1).sum())

    @property
    def hit_rate(self) -> float:
        """Share of the retrieved blocks that were guessed (1.0 before any were wanted)."""
        return self.hits / self.wanted if self.wanted else 1.0

    def drop(self, seq: int) -> None:
        """Forget the guesses of sequence ``seq``."""
        for key in [k for k in self._guess if k[0] == seq]:
            del self._guess[key]
