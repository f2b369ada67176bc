"""Copying rows of bytes between host memory and the device, driven by indices on the device.

The decode step knows which host rows it needs only as a device tensor. Copying them with torch
means moving the indices to the host first (a sync); a kernel that reads pinned host memory in
place (CUDA unified addressing, as ShadowKV's gather does) needs none. Both functions take a
``torch`` reference, which defines the results, and a Triton kernel used for CUDA indices and a
pinned host tensor.

- ``gather_rows(src, index)``: ``src[index]`` on ``index``'s device.
- ``scatter_rows(dst, index, rows)``: ``dst[index] = rows``.

A row is everything past the first dimension, of any dtype.
"""

from __future__ import annotations

import functools

import torch

from ..errors import ConfigError


def gather_rows(src: torch.Tensor, index: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``src[index]`` (``index`` ``(n,)`` int64 of rows of ``src``) on ``index``'s device.
    ``impl``: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton for CUDA indices into pinned host
    memory)."""
    if _use_triton(impl, index, src):
        return _gather_triton(src, index)
    # index_select copies whole rows; advanced indexing goes element by element (12x slower here).
    if index.device == src.device:
        return src.index_select(0, index)
    return src.index_select(0, index.to(src.device)).to(index.device)


def scatter_rows(dst: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, impl: str = "auto") -> None:
    """``dst[index] = rows`` (``rows`` ``(n, *dst.shape[1:])`` on ``index``'s device)."""
    if _use_triton(impl, index, dst):
        _scatter_triton(dst, index, rows)
        return
    dst.index_copy_(0, index.to(dst.device), rows.to(dst.device))


def _use_triton(impl: str, index: torch.Tensor, host: torch.Tensor) -> bool:
    if impl == "triton":
        if _kernels() is None:
            raise ConfigError("rows: impl='triton' needs Triton installed")
        return True
    return impl == "auto" and index.is_cuda and not host.is_cuda and _kernels() is not None and host.is_pinned()


@functools.cache
def _kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def copy_rows(src_ptr, src_index_ptr, dst_ptr, dst_index_ptr, nbytes, BLOCK: tl.constexpr):
        # Program (row, chunk): BLOCK bytes of one row, read and written as bytes.
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        ok = offs < nbytes
        s = tl.load(src_index_ptr + row).to(tl.int64) if src_index_ptr is not None else row
        d = tl.load(dst_index_ptr + row).to(tl.int64) if dst_index_ptr is not None else row
        data = tl.load(src_ptr + s * nbytes + offs, mask=ok)
        tl.store(dst_ptr + d * nbytes + offs, data, mask=ok)

    return triton, copy_rows


_BLOCK = 4096


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(rows, bytes per row)`` uint8 (a view)."""
    return t.reshape(t.shape[0], -1).view(torch.uint8)


def _gather_triton(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    triton, copy_rows = _kernels()
    out = torch.empty((index.numel(), *src.shape[1:]), dtype=src.dtype, device=index.device)
    nbytes = _bytes(src).shape[1]
    if index.numel():
        copy_rows[(index.numel(), triton.cdiv(nbytes, _BLOCK))](_bytes(src), index, _bytes(out), None, nbytes,
                                                                BLOCK=_BLOCK)
    return out


def _scatter_triton(dst: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    triton, copy_rows = _kernels()
    nbytes = _bytes(dst).shape[1]
    if index.numel():
        copy_rows[(index.numel(), triton.cdiv(nbytes, _BLOCK))](_bytes(rows.contiguous()), None, _bytes(dst), index,
                                                                nbytes, BLOCK=_BLOCK)
