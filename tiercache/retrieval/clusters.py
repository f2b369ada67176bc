"""Batched k-means and 4-bit product quantization of keys, as tensor functions (no host sync).

Both work on a batch of independent point sets (one per row and KV head, or per subspace), so
that a segment of every row and head of a layer is indexed in a few ops:

- ``kmeans(points, valid, k)``: ``k`` centroids and each point's cluster (``k`` for an invalid
  point), by Lloyd's iterations from evenly spaced points; fp32 arithmetic.
- ``train_codebooks`` / ``encode``: product quantization with subspaces of ``SUBSPACE`` dims and
  ``CODEBOOK`` centroids each (4-bit codes, two per byte: ``head_dim / 8`` bytes per key). A step
  scores a code from a table of the query's dot products with every centroid
  (``retrieval.token_select``).
"""

from __future__ import annotations

import torch

#: Dims per product-quantization subspace, and centroids per subspace (4-bit codes).
SUBSPACE = 4
CODEBOOK = 16


def kmeans(points: torch.Tensor, valid: torch.Tensor | None, k: int, iters: int = 8
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids ``(B, k, D)`` (fp32) of ``points`` ``(B, N, D)`` and each point's cluster ``(B,
    N)`` int64, ``k`` for points that ``valid`` ``(B, N)`` (None: all) marks invalid. A cluster
    that loses every point keeps its last centroid (and no point)."""
    x = points.float()
    batch, n, dim = x.shape
    init = torch.linspace(0, n - 1, k, device=x.device).round().long()
    centroids = x[:, init].clone()
    norms = (x * x).sum(-1, keepdim=True)
    ones = torch.ones(batch, n, 1, device=x.device)
    for step in range(iters + 1):
        dist = torch.baddbmm(norms, x, centroids.transpose(1, 2), alpha=-2.0) + (centroids * centroids).sum(-1)[:, None]
        assign = dist.argmin(-1)
        if valid is not None:
            assign = assign.masked_fill(~valid, k)
        if step == iters:
            return centroids, assign
        index = assign[..., None]
        sums = x.new_zeros(batch, k + 1, dim).scatter_add_(1, index.expand(-1, -1, dim), x)[:, :k]
        counts = x.new_zeros(batch, k + 1, 1).scatter_add_(1, index, ones)[:, :k]
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    raise AssertionError("unreachable")


def train_codebooks(keys: torch.Tensor, valid: torch.Tensor | None, iters: int = 8) -> torch.Tensor:
    """Product-quantization codebooks ``(B, m, CODEBOOK, SUBSPACE)`` (fp32) of keys ``(B, N, D)``,
    ``m = D / SUBSPACE`` subspaces of consecutive dims."""
    batch, n, dim = keys.shape
    m = dim // SUBSPACE
    sub = keys.float().view(batch, n, m, SUBSPACE).transpose(1, 2).reshape(batch * m, n, SUBSPACE)
    mask = None if valid is None else valid.repeat_interleave(m, 0)
    books, _ = kmeans(sub, mask, CODEBOOK, iters)
    return books.view(batch, m, CODEBOOK, SUBSPACE)


def encode(keys: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """4-bit codes of keys ``(B, N, D)`` against ``books`` ``(B, m, CODEBOOK, SUBSPACE)``, two per
    byte, subspace-major: ``(B, m / 2, N)`` uint8, byte ``i`` holding subspace ``i`` in its low
    nibble and subspace ``i + m / 2`` in its high one."""
    batch, n, dim = keys.shape
    m = dim // SUBSPACE
    sub = keys.float().view(batch, n, m, 1, SUBSPACE)
    nearest = (sub - books.float()[:, None]).square().sum(-1).argmin(-1).to(torch.uint8)   # (B, N, m)
    return (nearest[..., : m // 2] | (nearest[..., m // 2 :] << 4)).transpose(1, 2)
