"""Round-to-nearest quantization as pure functions.

One function covers every granularity the study uses. The statistics (min/max or absmax) are taken
over *groups* of ``group_size`` consecutive elements along one ``axis``:

| granularity                 | axis          | group_size      |
| --------------------------- | ------------- | --------------- |
| per tensor                  | None          | None            |
| per output channel (weight) | -1 (input)    | None (whole row)|
| per token (activation, K/V) | -1 (channels) | None            |
| per group of g              | the grouped axis | g            |
| KIVI key (per channel)      | -2 (tokens)   | G               |

Asymmetric uses ``2**bits - 1`` levels between min and max; symmetric uses a signed grid
``[-2**(bits-1), 2**(bits-1) - 1]`` scaled by absmax. 16 bits means "not quantized" and returns the
input object unchanged. A group whose max equals its min gets scale 1 (the guard the reference
implementations lack), so it dequantizes to its exact value instead of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL_PRECISION_BITS = 16


@dataclass(frozen=True)
class QParams:
    """Integer codes with the per-group scale and zero needed to dequantize them.

    ``codes`` has the grouped shape ``(..., n_groups, group_size)`` with the grouped axis moved last;
    ``scale`` and ``zero`` have shape ``(..., n_groups, 1)``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    symmetric: bool


def _grouped(x: torch.Tensor, axis: int | None, group_size: int | None) -> torch.Tensor:
    """View ``x`` so that each quantization group is one row of the last dimension."""
    if axis is None:
        return x.reshape(1, -1)
    x = x.movedim(axis, -1)
    n = x.shape[-1]
    g = n if group_size is None else group_size
    if n % g:
        raise ValueError(f"group_size={g} does not divide the grouped dimension of size {n}")
    # (..., n) -> (..., n // g, g)
    return x.reshape(*x.shape[:-1], n // g, g)


def quantize(x: torch.Tensor, bits: int, axis: int | None = -1, group_size: int | None = None,
             symmetric: bool = False, exclude: torch.Tensor | None = None) -> QParams:
    """Quantize ``x`` in groups; ``exclude`` (bool, same shape) marks elements kept out of min/max."""
    if not 1 <= bits <= 8 or (symmetric and bits < 2):
        raise ValueError(f"bits={bits} is not a quantized width (asymmetric 1-8, symmetric 2-8)")
    xg = _grouped(x.float(), axis, group_size)
    if exclude is not None:
        ex = _grouped(exclude, axis, group_size)
        lo = xg.masked_fill(ex, float("inf")).amin(-1, keepdim=True)
        hi = xg.masked_fill(ex, float("-inf")).amax(-1, keepdim=True)
        # a group made only of excluded elements has no statistics: give it a zero range
        empty = ex.all(-1, keepdim=True)
        lo = torch.where(empty, torch.zeros_like(lo), lo)
        hi = torch.where(empty, torch.zeros_like(hi), hi)
    else:
        lo = xg.amin(-1, keepdim=True)
        hi = xg.amax(-1, keepdim=True)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.maximum(hi.abs(), lo.abs()) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.round(xg / scale).clamp(-qmax - 1, qmax)
        zero = torch.zeros_like(scale)
    else:
        qmax = 2**bits - 1
        scale = (hi - lo) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.round((xg - lo) / scale).clamp(0, qmax)
        zero = lo
    return QParams(codes.to(torch.int16), scale, zero, bits, symmetric)


def dequantize(q: QParams, like: torch.Tensor, axis: int | None = -1) -> torch.Tensor:
    """Inverse of :func:`quantize`, returned in the shape and dtype of ``like``."""
    xg = q.codes.float() * q.scale + q.zero
    if axis is None:
        return xg.reshape(like.shape).to(like.dtype)
    moved = like.movedim(axis, -1)
    return xg.reshape(moved.shape).movedim(-1, axis).to(like.dtype)


def fake_quantize(x: torch.Tensor, bits: int, axis: int | None = -1, group_size: int | None = None,
                  symmetric: bool = False, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize; the identity (same object) at 16 bits."""
    if bits >= FULL_PRECISION_BITS:
        return x
    return dequantize(quantize(x, bits, axis, group_size, symmetric, exclude), x, axis)


def packed_bytes(n_elements: int, bits: int, group_size: int | None, n_groups: int | None = None,
                 param_bytes: int = 2, symmetric: bool = False) -> int:
    """Bytes a packed layout needs: ``bits`` per element plus an fp16 scale (and zero) per group.

    A formula, not a measurement: it is what a real low-bit layout would hold, reported beside the
    bytes actually held so the two are never confused.
    """
    if bits >= FULL_PRECISION_BITS:
        return n_elements * param_bytes
    if n_groups is None:
        n_groups = 1 if group_size is None else -(-n_elements // group_size)
    per_group = param_bytes * (1 if symmetric else 2)
    return -(-n_elements * bits // 8) + n_groups * per_group


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """||x - x_hat|| / ||x||, the reconstruction error used in tests and diagnostics."""
    x = x.float()
    return float((x - x_hat.float()).norm() / x.norm().clamp_min(1e-12))


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's ``compute_error``)."""
    return -20.0 * torch.log10(torch.tensor(relative_error(x, x_hat)).clamp_min(1e-12)).item()
