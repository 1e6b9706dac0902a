"""MX (OCP Microscaling Formats (MX) Specification v1.0, September 2023): blocks of 32 sharing a
power-of-two E8M0 scale.

| format | element (§5.3)            | emax_elem | element max | block | scale (§5.4.1) | bits per element   |
| ------ | ------------------------- | --------- | ----------- | ----- | -------------- | ------------------ |
| mxfp8  | FP8 E4M3 (§5.3.1: OFP8's) | 8         | 448         | 32    | E8M0, 1 byte   | 8 + 8 / 32 = 8.25  |
| mxfp4  | FP4 E2M1 (§5.3.3)         | 2         | 6           | 32    | E8M0, 1 byte   | 4 + 8 / 32 = 4.25  |

Sections: §5.3 element data types (§5.3.1 FP8, §5.3.3 FP4), §5.4.1 the E8M0 scale (exponent bias
127, 0xFF NaN, no zero: 0x00 is 2**-127), §6.3 the conversion of a block of scalars to MX (its Algorithm 1).

Blocks are 32 consecutive elements along the last axis, which is the reduction axis wherever
qeval uses them: a weight's input dimension, an activation's channels, a key's or value's head_dim.

Conversion (§6.3, the spec's reference algorithm): per block,
``shared_exp = floor(log2(amax)) - emax_elem``, raised to E8M0's smallest exponent, -127, where it
falls below (as microsoft/microxcaling's ``_quantize_mx`` does; its NaN for an exponent above 127
cannot arise from float32, whose amax < 2**128 gives at most 127 - emax_elem), and
``X = 2**shared_exp``; each element becomes ``V_i / X`` rounded to the element format, to nearest
with ties to even, and saturating: a quotient above the element's largest normal is clamped to it
(``amax / X`` lies in [2**emax, 2**(emax + 1)), so the block's largest magnitudes can exceed the
max: 6 for E2M1, 448 for E4M3, and saturate; that is the spec's choice, kept). ``V_i / X`` is exact
(a power-of-two scale). An all-zero block gets E8M0's smallest scale, 2**-127, and decodes to 0.
A block holding NaN or an infinity gets the E8M0 NaN code (0xFF, §5.4.1) and decodes to NaN, so a
broken input stays visible instead of saturating.

E8M0 scales are held as their biased exponent (uint8, ``shared_exp + 127``); E2M1 codes as uint8
(:mod:`.e2m1`), E4M3 codes as ``torch.float8_e4m3fn``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qeval.quant.formats import e2m1

BLOCK = 32
E8M0_BIAS = 127
E8M0_NAN = 255
# name -> (emax_elem, element bits)
ELEMENTS = {"mxfp4": (e2m1.EMAX, 4), "mxfp8": (8, 8)}
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


@dataclass(frozen=True)
class MXParams:
    """``codes``: (..., K // 32, 32), uint8 E2M1 codes (mxfp4) or float8_e4m3fn (mxfp8);
    ``scale_bits``: (..., K // 32, 1) uint8 biased E8M0 exponents."""

    codes: torch.Tensor
    scale_bits: torch.Tensor
    fmt: str


def blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """(..., K) -> (..., K // size, size); K must be a multiple of ``size``."""
    if x.shape[-1] % size:
        raise ValueError(f"blocks of {size} do not divide the last dimension of size {x.shape[-1]}")
    return x.unflatten(-1, (x.shape[-1] // size, size))


def shared_exponent(amax: torch.Tensor, emax_elem: int) -> torch.Tensor:
    """int32 ``floor(log2(amax)) - emax_elem`` clamped to [-127, 127]; amax 0 gives -127."""
    _, e = torch.frexp(amax.float())   # amax = m * 2**e, m in [0.5, 1): floor(log2 amax) = e - 1
    exp = torch.where(amax > 0, e - 1 - emax_elem, torch.full_like(e, -E8M0_BIAS))
    return exp.clamp(-E8M0_BIAS, E8M0_BIAS)


def scale_value(scale_bits: torch.Tensor) -> torch.Tensor:
    """Biased E8M0 exponents -> float32 ``2**(bits - 127)``; NaN for 0xFF."""
    one = torch.ones(scale_bits.shape, dtype=torch.float32, device=scale_bits.device)
    x = torch.ldexp(one, scale_bits.int() - E8M0_BIAS)
    return torch.where(scale_bits == E8M0_NAN, torch.full_like(x, float("nan")), x)


def quantize(x: torch.Tensor, fmt: str) -> MXParams:
    """Blocks of 32 along the last axis -> element codes and E8M0 scales (module docstring)."""
    emax_elem, _ = ELEMENTS[fmt]
    xb = blocks(x.float(), BLOCK)
    amax = xb.abs().amax(-1, keepdim=True)
    exp = shared_exponent(amax, emax_elem)
    finite = torch.isfinite(amax)
    scale_bits = torch.where(finite, exp + E8M0_BIAS, torch.full_like(exp, E8M0_NAN)).to(torch.uint8)
    # V_i / X, exact: X is a power of two; a non-finite block is encoded as zeros (its scale is NaN)
    y = torch.where(finite, torch.ldexp(xb, -exp), torch.zeros_like(xb))
    if fmt == "mxfp4":
        codes = e2m1.to_codes(e2m1.round_to_grid(y))
    else:
        codes = y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return MXParams(codes, scale_bits, fmt)


def element_values(q: MXParams) -> torch.Tensor:
    """The elements as float32, before the block scale."""
    return e2m1.from_codes(q.codes) if q.fmt == "mxfp4" else q.codes.float()


def dequantize(q: MXParams, dtype: torch.dtype) -> torch.Tensor:
    """(..., K // 32, 32) codes -> (..., K) in ``dtype``: element times its block's scale."""
    return (element_values(q) * scale_value(q.scale_bits)).flatten(-2).to(dtype)


def fake_quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return dequantize(quantize(x, fmt), x.dtype)


def packed_bytes(n_elements: int, fmt: str) -> int:
    """Element bits (two E2M1 codes per byte) plus one E8M0 byte per block of 32."""
    _, bits = ELEMENTS[fmt]
    return -(-n_elements * bits // 8) + -(-n_elements // BLOCK)
