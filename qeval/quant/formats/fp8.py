"""FP8 with a float32 scale: E4M3 "fn" and E5M2 (OCP 8-bit Floating Point Specification (OFP8),
revision 1.0; the OCP MX spec's FP8 elements, its §5.3.1, are these two).

| format     | torch dtype          | max   | infinities | NaN              | scale            |
| ---------- | -------------------- | ----- | ---------- | ---------------- | ---------------- |
| fp8_e4m3   | torch.float8_e4m3fn  | 448   | none       | S.1111.111 only  | ``amax / 448``   |
| fp8_e5m2   | torch.float8_e5m2    | 57344 | yes        | S.11111.{01..11} | ``amax / 57344`` |

The scale is float32 and, by default, dynamic: ``amax / max`` over each group of the grouping qeval uses
everywhere (:mod:`qeval.quant.primitives`: per tensor ``axis=None``, per output channel or per
token ``axis=-1``, groups of g ``group_size=g``), so the group's largest magnitude maps onto the
format's largest finite value. An all-zero group gets scale 1. Encoding is

``codes = (x / scale).clamp(-max, max).to(dtype)``: round to nearest even (torch's cast) and
saturating, because the clamp comes before the cast (an unclamped E4M3 overflow is NaN, an E5M2
one is inf);

decoding is ``codes.float() * scale``, then the caller's dtype. Everything between the input and
the final cast is float32, so a bfloat16 / float16 input is rounded once more only on the way out.

A static scale (``kv_scale=static``, :mod:`qeval.calibration.kv_scales`) is the same ``amax / max``
with the amax taken once over calibration data instead of from the group itself; encoding with it
is the same :func:`encode`, so a value beyond that amax saturates at ``±max * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qeval.quant.primitives import _grouped

DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
MAX = {name: float(torch.finfo(dtype).max) for name, dtype in DTYPES.items()}   # 448, 57344
SCALE_BYTES = 4   # one float32 scale per group


@dataclass(frozen=True)
class FP8Params:
    """``codes`` (float8, grouped shape ``(..., n_groups, group_size)`` with the grouped axis last)
    and ``scale`` (float32, ``(..., n_groups, 1)``)."""

    codes: torch.Tensor
    scale: torch.Tensor
    fmt: str


def scale_from_amax(amax: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 ``amax / max``; 1 where that is 0 (an all-zero group, or an amax so small the
    quotient underflows), so encoding never divides by zero."""
    scale = amax.float() / MAX[fmt]
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def encode(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x / scale`` saturated to ±max, then cast (round to nearest even) to the FP8 dtype."""
    m = MAX[fmt]
    return (x.float() / scale).clamp(-m, m).to(DTYPES[fmt])


def decode(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` in float32, returned in ``dtype``.

    ``codes`` has the shape of the quantized tensor and ``scale`` the shape ``(..., n)``: n groups
    of equal size along the last axis, leading dimensions broadcast (``(1, 1)`` per tensor,
    ``(out, 1)`` per channel, ``(B, H, T, n)`` per token in groups of D / n).
    """
    n = scale.shape[-1]
    # (..., D) -> (..., n, D // n): each group times its own scale
    xg = codes.float().unflatten(-1, (n, codes.shape[-1] // n)) * scale.unsqueeze(-1)
    return xg.flatten(-2).to(dtype)


def quantize(x: torch.Tensor, fmt: str, axis: int | None = -1, group_size: int | None = None,
             exclude: torch.Tensor | None = None) -> FP8Params:
    """Group as :func:`qeval.quant.primitives.quantize` does; ``exclude`` (bool, like ``x``) marks
    elements kept out of the amax (left padding), which are still encoded."""
    xg = _grouped(x.float(), axis, group_size)
    mag = xg.abs()
    if exclude is not None:
        mag = mag.masked_fill(_grouped(exclude, axis, group_size), 0)
    scale = scale_from_amax(mag.amax(-1, keepdim=True), fmt)
    return FP8Params(encode(xg, scale, fmt), scale, fmt)


def dequantize(q: FP8Params, like: torch.Tensor, axis: int | None = -1) -> torch.Tensor:
    """Inverse of :func:`quantize`, in the shape and dtype of ``like``."""
    xg = q.codes.float() * q.scale
    if axis is None:
        return xg.reshape(like.shape).to(like.dtype)
    moved = like.movedim(axis, -1)
    return xg.reshape(moved.shape).movedim(-1, axis).to(like.dtype)


def fake_quantize(x: torch.Tensor, fmt: str, axis: int | None = -1, group_size: int | None = None,
                  exclude: torch.Tensor | None = None) -> torch.Tensor:
    return dequantize(quantize(x, fmt, axis, group_size, exclude), x, axis)


def packed_bytes(n_elements: int, n_groups: int) -> int:
    """One byte per element plus a float32 scale per group."""
    return n_elements + SCALE_BYTES * n_groups
