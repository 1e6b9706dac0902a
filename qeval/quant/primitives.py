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

Asymmetric uses ``2**bits - 1`` levels; where the grid sits is the *zero-point convention*, a named
choice because the papers qeval reproduces differ on it (``lo``/``hi``: a group's min/max,
``qmax = 2**bits - 1``, ``q``: the code, ``x_hat``: the dequantized value):

| zero_point | whose                | scale                               | zero                                   | x_hat                  | dtype   |
| ---------- | -------------------- | ----------------------------------- | -------------------------------------- | ---------------------- | ------- |
| real       | KIVI, GEAR           | ``(hi - lo) / qmax`` (1 when 0)     | ``lo``, a real offset                  | ``q * scale + zero``   | float32 |
| integer    | Qllm-Eval, llm-awq   | ``clamp(hi - lo, min=1e-5) / qmax`` | ``clamp(-round(lo / scale), 0, qmax)`` | ``(q - zero) * scale`` | x's own |
| gptq       | GPTQ ``find_params`` | ``(hi' - lo') / qmax``              | ``round(-lo' / scale)``                | ``(q - zero) * scale`` | float32 |

with ``q = clamp(round((x - lo) / scale), 0, qmax)`` (real) or ``clamp(round(x / scale) + zero, 0,
qmax)`` (integer, gptq), and for gptq ``lo' = min(lo, 0)``, ``hi' = max(hi, 0)`` (-1 and +1 when
both are 0).

The integer conventions represent 0 exactly (better on outlier-heavy groups). ``integer`` clips a
one-signed group: its zero is clamped into ``[0, qmax]``, so an all-positive group's grid starts at
0 and its largest elements saturate, and a constant group c > 0 dequantizes to ``qmax * scale =
1e-5``, exactly as the reference does. ``gptq`` widens the range to hold 0 first, so nothing is
clipped. ``integer`` is computed in the input's own dtype because the reference
(``pseudo_quantize_tensor``) is: in float16, ``(hi - lo) / qmax`` and ``x / scale`` round to
float16, and the same formula evaluated in float32 picks other codes and scales; computed in x's
dtype, qeval's codes, scales, zeros and ``x_hat`` equal the reference's bit for bit. GPTQ casts its
weight to float32 first and KIVI/GEAR keep float32 statistics, hence float32 for those two.

Symmetric uses a signed grid ``[-2**(bits-1), 2**(bits-1) - 1]`` scaled by ``absmax / (2**(bits-1)
- 1)`` with zero 0 in every convention: ``integer`` clamps absmax at 1e-5 and works in the input's
dtype (the reference's symmetric branch); ``real`` and ``gptq`` use a float32 absmax with scale 1 for
an all-zero group (GPTQ's own symmetric grid, zero ``(qmax + 1) / 2``, is not reproduced). 16 bits
means "not quantized" and returns the input object unchanged. A ``real`` group whose max equals its
min gets scale 1, so it dequantizes to its exact value instead of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL_PRECISION_BITS = 16
ZERO_POINTS = ("real", "integer", "gptq")
# the reference's range guard (Qllm-Eval / llm-awq ``clamp(min=1e-5)``), kept verbatim
INTEGER_RANGE_FLOOR = 1e-5


@dataclass(frozen=True)
class QParams:
    """Integer codes with the per-group scale and zero needed to dequantize them.

    ``codes`` has the grouped shape ``(..., n_groups, group_size)`` with the grouped axis moved last;
    ``scale`` and ``zero`` have shape ``(..., n_groups, 1)``. ``zero`` is what ``zero_point`` says:
    a real offset added after scaling (``real``) or an integer held in a float tensor and
    subtracted from the codes before scaling (``integer``, ``gptq``); 0 when ``symmetric``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    symmetric: bool
    zero_point: str = "real"


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


def _check(bits: int, symmetric: bool, zero_point: str) -> None:
    if not 1 <= bits <= 8 or (symmetric and bits < 2):
        raise ValueError(f"bits={bits} is not a quantized width (asymmetric 1-8, symmetric 2-8)")
    if zero_point not in ZERO_POINTS:
        raise ValueError(f"zero_point={zero_point}: allowed: {', '.join(ZERO_POINTS)}")


def _range(xg: torch.Tensor, ex: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) over the last dimension, ``ex`` (grouped like ``xg``) left out."""
    if ex is None:
        return xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    lo = xg.masked_fill(ex, float("inf")).amin(-1, keepdim=True)
    hi = xg.masked_fill(ex, float("-inf")).amax(-1, keepdim=True)
    # a group made only of excluded elements has no statistics: give it a zero range
    empty = ex.all(-1, keepdim=True)
    return torch.where(empty, torch.zeros_like(lo), lo), torch.where(empty, torch.zeros_like(hi), hi)


def _symmetric(xg, lo, hi, bits: int, zero_point: str):
    qmax = 2 ** (bits - 1) - 1
    absmax = torch.maximum(hi.abs(), lo.abs())
    if zero_point == "integer":
        scale = absmax.clamp(min=INTEGER_RANGE_FLOOR) / qmax
    else:
        scale = absmax / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round(xg / scale).clamp(-qmax - 1, qmax)
    return codes, scale, torch.zeros_like(scale)


def _real(xg, lo, hi, bits: int):
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round((xg - lo) / scale).clamp(0, qmax), scale, lo


def _integer(xg, lo, hi, bits: int):
    """Qllm-Eval / llm-awq ``pseudo_quantize_tensor``, op for op in ``xg``'s dtype."""
    qmax = 2**bits - 1
    scale = (hi - lo).clamp(min=INTEGER_RANGE_FLOOR) / qmax
    zero = (-torch.round(lo / scale)).clamp(0, qmax)
    return (torch.round(xg / scale) + zero).clamp(0, qmax), scale, zero


def _gptq(xg, lo, hi, bits: int):
    """GPTQ ``Quantizer.find_params`` + ``quantize`` (asymmetric): the range always holds 0."""
    qmax = 2**bits - 1
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    both_zero = (lo == 0) & (hi == 0)
    lo = torch.where(both_zero, -torch.ones_like(lo), lo)
    hi = torch.where(both_zero, torch.ones_like(hi), hi)
    scale = (hi - lo) / qmax
    zero = torch.round(-lo / scale)
    return (torch.round(xg / scale) + zero).clamp(0, qmax), scale, zero


_ASYMMETRIC = {"real": _real, "integer": _integer, "gptq": _gptq}


def quantize(x: torch.Tensor, bits: int, axis: int | None = -1, group_size: int | None = None,
             symmetric: bool = False, exclude: torch.Tensor | None = None,
             zero_point: str = "real") -> QParams:
    """Quantize ``x`` in groups; ``exclude`` (bool, same shape) marks elements kept out of min/max.
    ``zero_point`` is the convention of the module docstring's second table."""
    _check(bits, symmetric, zero_point)
    native = zero_point == "integer" and x.is_floating_point()
    xg = _grouped(x if native else x.float(), axis, group_size)
    lo, hi = _range(xg, None if exclude is None else _grouped(exclude, axis, group_size))
    if symmetric:
        codes, scale, zero = _symmetric(xg, lo, hi, bits, zero_point)
    else:
        codes, scale, zero = _ASYMMETRIC[zero_point](xg, lo, hi, bits)
    return QParams(codes.to(torch.int16), scale, zero, bits, symmetric, zero_point)


def real_offset(q: QParams) -> torch.Tensor:
    """The float32 offset ``o`` with ``x_hat = codes * scale + o``: the ``real`` zero itself, or
    ``-zero * scale`` for an integer zero (one float32 rounding of that product)."""
    if q.zero_point == "real":
        return q.zero.float()
    return -(q.zero.float() * q.scale.float())


def dequantize(q: QParams, like: torch.Tensor, axis: int | None = -1) -> torch.Tensor:
    """Inverse of :func:`quantize`, returned in the shape and dtype of ``like``.

    Integer conventions: ``codes - zero`` is a small exact integer and a float16/bfloat16 scale has
    at most 11 significant bits, so ``(codes - zero) * scale`` is exact in float32 and the one
    rounding to ``like``'s dtype equals the reference's product in that dtype.
    """
    work = torch.promote_types(q.scale.dtype, torch.float32)
    if q.zero_point == "real":
        xg = q.codes.to(work) * q.scale + q.zero
    else:
        xg = (q.codes.to(work) - q.zero.to(work)) * q.scale.to(work)
    if axis is None:
        return xg.reshape(like.shape).to(like.dtype)
    moved = like.movedim(axis, -1)
    return xg.reshape(moved.shape).movedim(-1, axis).to(like.dtype)


def fake_quantize(x: torch.Tensor, bits: int, axis: int | None = -1, group_size: int | None = None,
                  symmetric: bool = False, exclude: torch.Tensor | None = None,
                  zero_point: str = "real") -> torch.Tensor:
    """Quantize then dequantize; the identity (same object) at 16 bits."""
    if bits >= FULL_PRECISION_BITS:
        return x
    return dequantize(quantize(x, bits, axis, group_size, symmetric, exclude, zero_point), x, axis)


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
