"""``TokenIndex``: the compact device index of token-granular retrieval (``RetrievalConfig.index
= "tokens"``), per layer, row and KV head.

- **Codes.** Every cached token's key as a 4-bit product-quantization code: ``head_dim / 8``
  bytes (``retrieval.clusters``). A step scores every token from its code (PQCache style), so
  nothing routes the search and no token is missed for want of a candidate.
- **Codebooks per segment.** Keys rotate with their position (RoPE), so one codebook for a long
  context codes its later tokens badly (measured: recall of attention mass 0.886 against 0.945
  at 8K tokens, proto). Tokens fall into segments of ``segment_tokens``; each segment has its
  own codebooks, trained on its own keys when it is full (*sealed*). The open segment codes with
  its predecessor's codebooks; the first segment, which has none, trains its own as soon as it
  has tokens, at ``FIRST_TRAINING`` tokens and at each doubling, coding its tokens again each
  time.
- **Runs.** Consecutive runs of ``run_tokens`` tokens keep their mean key, mean value and count.
  A step estimates the tokens of a run it does not read as one virtual token: the run's mean key
  weighted by the count of those tokens, with the run's mean value.

Tokens are indexed when their storage block seals (``decode.kv``): the open block's tokens are
always in the window a step reads exactly. State is per layer, in tensors whose first dimension
is ``rows * kv_heads`` (row-major); capacities double as the context grows. The decode layer
drives it: it indexes sealed blocks, and hands it a segment's keys to train and seal.
"""

from __future__ import annotations

import torch

from ..capacity import grown
from ..errors import ConfigError
from .clusters import CODEBOOK, SUBSPACE, encode, train_codebooks

#: Tokens of the first segment at which it trains its codebook again (after its first tokens),
#: and again at each doubling until it seals.
FIRST_TRAINING = 64


class TokenIndex:
    """The token index of ``layers`` layers for ``rows`` rows of ``kv_heads`` heads of
    ``head_dim`` dims (module docstring); codebooks in ``dtype``."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, segment_tokens: int,
                 run_tokens: int, device: torch.device, dtype: torch.dtype) -> None:
        if head_dim % (2 * SUBSPACE):
            raise ConfigError(f"the token index codes keys in {SUBSPACE}-dim subspaces, two per byte: head_dim "
                              f"{head_dim} must be a multiple of {2 * SUBSPACE}")
        if segment_tokens % run_tokens:
            raise ConfigError(f"segment_tokens ({segment_tokens}) must be a multiple of run_tokens ({run_tokens})")
        self.rows, self.kv_heads, self.head_dim = rows, kv_heads, head_dim
        self.segment, self.run = segment_tokens, run_tokens
        self.subspaces = head_dim // SUBSPACE
        self.device, self.dtype = device, dtype
        b, m = rows * kv_heads, self.subspaces
        self.codes = [torch.zeros(b, m // 2, 0, dtype=torch.uint8, device=device) for _ in range(layers)]
        # Segment s's codebooks at [..., s * CODEBOOK : (s + 1) * CODEBOOK], the open segment's
        # at s = sealed; laid out (subspace, dim, centroid) so that a query's table of dot
        # products with every centroid of every segment is one matmul.
        self.books = [torch.zeros(b, m, SUBSPACE, CODEBOOK, dtype=dtype, device=device) for _ in range(layers)]
        # Per run: its mean key and mean value (one row of 2 * head_dim), and its count of real
        # tokens (fp32).
        self.runs = [torch.zeros(b, 0, 2 * head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.run_counts = [torch.zeros(b, 0, device=device) for _ in range(layers)]
        #: Per layer: tokens indexed (coded, counted in runs); sealed segments; the open segment's
        #: size when its codebook was last trained (0: it codes with its predecessor's, or none).
        self.indexed = [0] * layers
        self.sealed = [0] * layers
        self.trained = [0] * layers
        self._offsets = torch.zeros(m, 0, dtype=torch.int64, device=device)
        self._offsets_key = 0

    # ------------------------------------------------------------------ what a step reads

    def open_start(self, layer: int) -> int:
        """First position of ``layer``'s open segment."""
        return self.sealed[layer] * self.segment

    def books_of(self, layer: int) -> torch.Tensor:
        """``(rows * kv_heads, subspaces, SUBSPACE, segments * CODEBOOK)``: every segment's codebooks
        (the open one's last)."""
        return self.books[layer][..., : (self.sealed[layer] + 1) * CODEBOOK]

    def offsets(self, tokens: int) -> torch.Tensor:
        """``(subspaces, tokens)``: where token ``t``'s centroids start in a subspace's row of a
        table of the query's dot products with every segment's centroids: ``(t // segment_tokens)
        * CODEBOOK``."""
        if tokens != self._offsets_key:
            self._offsets = (torch.arange(tokens, device=self.device) // self.segment * CODEBOOK).expand(
                self.subspaces, -1)
            self._offsets_key = tokens
        return self._offsets

    def nbytes(self, layer: int) -> dict[str, int]:
        """Bytes one step of ``layer`` reads from the index, per row and KV head: every code, the
        codebooks of every segment, the value sums and counts of every run."""
        tokens, m = self.indexed[layer], self.subspaces
        return {"codes": tokens * (m // 2),
                "codebooks": (self.sealed[layer] + 1) * m * CODEBOOK * SUBSPACE * self.dtype.itemsize,
                "runs": -(-tokens // self.run) * (2 * self.head_dim * self.dtype.itemsize + 4)}

    def resident_bytes(self) -> int:
        """Device bytes the index holds, over every layer, row and head (capacity not yet used
        excluded)."""
        return sum(sum(self.nbytes(layer).values()) for layer in range(len(self.indexed))) * self.rows * self.kv_heads

    # ------------------------------------------------------------------ writing

    def needs_training(self, layer: int) -> bool:
        """Whether the open segment should (re)train its codebook on its own keys: only the first
        segment, which has no predecessor's to code with: as soon as it has tokens, at
        ``FIRST_TRAINING`` tokens and at each doubling after that. Later segments code with their
        predecessor's codebook until they seal (proto/v3.py measured the recall with that)."""
        size = self.indexed[layer] - self.open_start(layer)
        if self.sealed[layer]:
            return False
        return size > 0 if not self.trained[layer] else size >= max(FIRST_TRAINING, 2 * self.trained[layer])

    def fills_segment(self, layer: int) -> bool:
        """Whether ``layer``'s open segment is full (``seal`` it now)."""
        return self.indexed[layer] == self.open_start(layer) + self.segment

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Index the next tokens of ``layer`` (keys and values ``(rows, kv_heads, n, head_dim)``,
        validity ``(rows, n)`` or None), which must not reach past the open segment: codes from the
        open codebook, keys and values into the means of their runs."""
        b, n, d = self.rows * self.kv_heads, keys.shape[2], self.head_dim
        first = self.indexed[layer]
        end = first + n
        if end > self.open_start(layer) + self.segment:
            raise ConfigError(f"token index: tokens {first}..{end} of layer {layer} cross the open segment's end")
        self.codes[layer] = grown(self.codes[layer], 2, end)
        runs = -(-end // self.run)
        self.runs[layer] = grown(self.runs[layer], 1, runs)
        self.run_counts[layer] = grown(self.run_counts[layer], 1, runs)
        self.codes[layer][:, :, first:end] = encode(keys.reshape(b, n, d), self._books(layer, self.sealed[layer]))
        self._add_to_runs(layer, first, keys, values, valid)
        self.indexed[layer] = end

    def train_open(self, layer: int, keys: torch.Tensor, valid: torch.Tensor | None) -> None:
        """(Re)train the open segment's codebook on its keys ``(rows, kv_heads, n, head_dim)``
        (every token of it indexed so far; validity ``(rows, n)``) and code them again."""
        b, n = self.rows * self.kv_heads, keys.shape[2]
        keys = keys.reshape(b, n, self.head_dim)
        mask = None if valid is None else valid.repeat_interleave(self.kv_heads, 0)
        seg = self.sealed[layer]
        self.books[layer] = grown(self.books[layer], 3, (seg + 1) * CODEBOOK)
        self.books[layer][..., seg * CODEBOOK : (seg + 1) * CODEBOOK] = train_codebooks(keys, mask).transpose(2, 3)
        start = self.open_start(layer)
        self.codes[layer][:, :, start : start + n] = encode(keys, self._books(layer, seg))
        self.trained[layer] = n

    def seal(self, layer: int, keys: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Seal ``layer``'s full open segment, given its keys ``(rows, kv_heads, segment_tokens,
        head_dim)`` (validity ``(rows, segment_tokens)``): its own codebook, its tokens coded
        with it, and the next segment open with a copy of it."""
        self.train_open(layer, keys, valid)
        self.sealed[layer] += 1
        self.trained[layer] = 0
        seg = self.sealed[layer]
        self.books[layer] = grown(self.books[layer], 3, (seg + 1) * CODEBOOK)
        self.books[layer][..., seg * CODEBOOK : (seg + 1) * CODEBOOK] = self._books(layer, seg - 1).transpose(2, 3)

    def cut(self, layer: int, tokens: int, tail_keys: torch.Tensor, tail_values: torch.Tensor,
            tail_valid: torch.Tensor | None) -> None:
        """Forget ``layer``'s tokens from ``tokens`` on (rounded down to what was indexed). A
        segment the cut falls into opens again, with its own codebook; the run it falls into
        is counted again from ``tail_keys`` / ``tail_values`` ``(rows, kv_heads, n, head_dim)``, the
        run's tokens before the cut (validity ``(rows, n)``)."""
        if tokens >= self.indexed[layer]:
            return
        self.indexed[layer] = tokens
        if tokens < self.open_start(layer):
            self.sealed[layer] = tokens // self.segment
            self.trained[layer] = 0
        run = tokens // self.run
        self.runs[layer][:, run:] = 0.0
        self.run_counts[layer][:, run:] = 0.0
        if tail_keys.shape[2]:
            self._add_to_runs(layer, run * self.run, tail_keys, tail_values, tail_valid)

    def _add_to_runs(self, layer: int, first: int, keys: torch.Tensor, values: torch.Tensor,
                     valid: torch.Tensor | None) -> None:
        """Count tokens ``first, ...`` (keys and values ``(rows, kv_heads, n, head_dim)``, validity
        ``(rows, n)``) into the means of their runs (in fp32, stored in the index's dtype)."""
        b, n, d = self.rows * self.kv_heads, keys.shape[2], self.head_dim
        both = torch.cat([keys.reshape(b, n, d), values.reshape(b, n, d)], 2).float()
        lo, hi = first // self.run, (first + n - 1) // self.run + 1
        if valid is None and hi - lo == 1:  # a decode step's sealed block: inside one run, no padding
            sums, counts = both.sum(1, keepdim=True), self.run_counts[layer][:, lo:hi] + n
        else:
            weight = torch.ones(b, n, device=self.device) if valid is None else \
                valid.float().repeat_interleave(self.kv_heads, 0)
            run = torch.arange(first, first + n, device=self.device) // self.run - lo
            sums = both.new_zeros(b, hi - lo, 2 * d).index_add_(1, run, both * weight[..., None])
            counts = self.run_counts[layer][:, lo:hi] + weight.new_zeros(b, hi - lo).index_add_(1, run, weight)
        old = self.runs[layer][:, lo:hi].float() * self.run_counts[layer][:, lo:hi, None]
        self.runs[layer][:, lo:hi] = ((old + sums) / counts.clamp(min=1)[..., None]).to(self.dtype)
        self.run_counts[layer][:, lo:hi] = counts

    def _books(self, layer: int, segment: int) -> torch.Tensor:
        """Segment ``segment``'s codebooks of ``layer``, ``(B, subspaces, CODEBOOK, SUBSPACE)``."""
        return self.books[layer][..., segment * CODEBOOK : (segment + 1) * CODEBOOK].transpose(2, 3)

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``r`` becomes old row ``index[r]`` (beam search)."""
        rows = (index[:, None] * self.kv_heads + torch.arange(self.kv_heads, device=index.device)).reshape(-1)
        for name in ("codes", "books", "runs", "run_counts"):
            setattr(self, name, [t[rows] for t in getattr(self, name)])
        self.rows = len(index)
