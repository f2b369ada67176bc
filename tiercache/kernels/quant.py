"""Min-max (asymmetric) integer quantization of rows: the kernel under the ``quant`` codec.

Each row of ``x`` (shape ``(rows, group)``) is one quantization group: codes are
``round((x - zero) / scale)`` clamped to ``[0, 2**bits - 1]``, with ``zero = min(row)`` and
``scale = (max(row) - min(row)) / (2**bits - 1)``, both rounded to ``meta_dtype`` *before* the codes
are computed, so the stored metadata is exactly what the decoder uses.

``quantize_rows`` / ``dequantize_rows`` run a Triton kernel when ``x`` is on a CUDA device and
Triton is installed (and the metadata is fp16), else the torch reference (``*_torch``), which
defines the results. Triton is imported lazily: this module imports, and computes, without it.
"""

from __future__ import annotations

import functools

import torch

from ..errors import ShapeError


def quantize_rows_torch(
    x: torch.Tensor, bits: int, meta_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference quantizer. ``x``: ``(rows, group)`` float. Returns ``codes`` uint8 ``(rows, group)``,
    ``scale`` and ``zero`` of ``meta_dtype``, shape ``(rows,)``."""
    xf = x.float()
    lo = xf.amin(dim=1)
    hi = xf.amax(dim=1)
    levels = (1 << bits) - 1
    zero = lo.to(meta_dtype)
    scale = ((hi - zero.float()) / levels).to(meta_dtype)
    # A zero-range group has scale 0; dividing by 1 instead sends every element to code 0.
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = torch.round((xf - zero.float()[:, None]) / safe[:, None]).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


def dequantize_rows_torch(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Reference dequantizer: ``codes * scale + zero`` per row, computed in fp32, cast to ``dtype``."""
    return (codes.float() * scale.float()[:, None] + zero.float()[:, None]).to(dtype)


@functools.cache
def _triton_kernels():
    """The Triton kernels, or None when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def quantize_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, group, levels, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < group
        x = tl.load(x_ptr + row * group + offs, mask=mask, other=0.0).to(tl.float32)
        lo = tl.min(tl.where(mask, x, float("inf")), axis=0)
        hi = tl.max(tl.where(mask, x, float("-inf")), axis=0)
        zero = lo.to(tl.float16, fp_downcast_rounding="rtne")
        scale = ((hi - zero.to(tl.float32)) / levels).to(tl.float16, fp_downcast_rounding="rtne")
        safe = tl.where(scale.to(tl.float32) == 0.0, 1.0, scale.to(tl.float32))
        q = (x - zero.to(tl.float32)) / safe
        # Round half to even, as torch.round does.
        r = tl.floor(q + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        r = tl.where(((r - q) == 0.5) & odd, r - 1.0, r)
        q = tl.minimum(tl.maximum(r, 0.0), levels)
        tl.store(codes_ptr + row * group + offs, q.to(tl.uint8), mask=mask)
        tl.store(scale_ptr + row, scale)
        tl.store(zero_ptr + row, zero)

    @triton.jit
    def dequantize_kernel(codes_ptr, scale_ptr, zero_ptr, out_ptr, group, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < group
        q = tl.load(codes_ptr + row * group + offs, mask=mask, other=0).to(tl.float32)
        scale = tl.load(scale_ptr + row).to(tl.float32)
        zero = tl.load(zero_ptr + row).to(tl.float32)
        out = q * scale + zero
        tl.store(out_ptr + row * group + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    return triton, quantize_kernel, dequantize_kernel


def triton_available() -> bool:
    """True when the Triton kernels can run (Triton installed and a CUDA device present)."""
    return torch.cuda.is_available() and _triton_kernels() is not None


def _use_triton(t: torch.Tensor, meta_dtype: torch.dtype) -> bool:
    # Only fp16 metadata: the bf16 downcast could not be checked against torch's rounding here.
    return t.is_cuda and meta_dtype == torch.float16 and _triton_kernels() is not None


def quantize_rows_triton(
    x: torch.Tensor, bits: int, meta_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``quantize_rows_torch`` (CUDA tensors, fp16 metadata only)."""
    triton, quantize_kernel, _ = _triton_kernels()
    x = x.contiguous()
    rows, group = x.shape
    codes = torch.empty((rows, group), dtype=torch.uint8, device=x.device)
    if meta_dtype != torch.float16:
        raise ShapeError(f"Triton quantizer stores fp16 scales and zeros, not {meta_dtype}")
    scale = torch.empty(rows, dtype=torch.float16, device=x.device)
    zero = torch.empty(rows, dtype=torch.float16, device=x.device)
    if rows:
        quantize_kernel[(rows,)](
            x, codes, scale, zero, group, float((1 << bits) - 1), BLOCK=triton.next_power_of_2(group)
        )
    return codes, scale, zero


def dequantize_rows_triton(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Triton version of ``dequantize_rows_torch`` (CUDA tensors)."""
    triton, _, dequantize_kernel = _triton_kernels()
    codes = codes.contiguous()
    rows, group = codes.shape
    out = torch.empty((rows, group), dtype=dtype, device=codes.device)
    if rows:
        dequantize_kernel[(rows,)](
            codes, scale.contiguous(), zero.contiguous(), out, group, BLOCK=triton.next_power_of_2(group)
        )
    return out


def quantize_rows(
    x: torch.Tensor, bits: int, meta_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x`` ``(rows, group)`` to ``bits``-bit codes (see module docstring)."""
    if _use_triton(x, meta_dtype):
        return quantize_rows_triton(x, bits, meta_dtype)
    return quantize_rows_torch(x, bits, meta_dtype)


def dequantize_rows(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of ``quantize_rows`` up to the quantization error; returns ``(rows, group)`` of ``dtype``."""
    if _use_triton(codes, scale.dtype):
        return dequantize_rows_triton(codes, scale, zero, dtype)
    return dequantize_rows_torch(codes, scale, zero, dtype)
