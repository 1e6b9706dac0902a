"""NVFP4 (NVIDIA Blackwell): E2M1 elements in blocks of 16, an E4M3 scale per block and a float32
scale per tensor, as NVIDIA describes it ("Introducing NVFP4 for Efficient and Accurate
Low-Precision Inference", NVIDIA Technical Blog, 2025; cuBLAS's block-scaling documentation). The
element is the OCP MX spec's FP4 E2M1 (§5.3.3); unlike MX the block scale is not a power of two
and there is no 0xFF NaN code: a block scale is an ordinary E4M3 number.

| quantity      | dtype               | per                                    | value                                              |
| ------------- | ------------------- | -------------------------------------- | -------------------------------------------------- |
| tensor scale  | float32             | tensor, or slices of it (``keep_dims``) | ``s_t = amax / (448 * 6)`` (1 when amax is 0)      |
| block scale   | float8_e4m3fn       | 16 consecutive elements                | ``s_b = e4m3(clamp(block_amax / 6 / s_t, 2**-6, 448))`` |
| element       | E2M1 (:mod:`.e2m1`) | element                                | ``e2m1(x * ((1 / s_t) / s_b))``, saturating at ±6  |
| dequantized   | float32 -> dtype    |                                        | ``element * (s_t * s_b)``                          |

4 + 8 / 16 = 4.5 bits per element, plus 4 bytes per tensor scale. Blocks run along the last axis
(a weight's input dimension, an activation's channels, head_dim for K/V).

``s_t`` puts the tensor's largest block scale at E4M3's largest value 448, so block scales use
E4M3's whole range. The block scale is clamped below at E4M3's smallest normal (2**-6), so an
all-zero block gets a nonzero scale and E4M3 subnormals are never used, and above at 448. The
element is computed as ``x`` times the reciprocal of the combined scale, in that order, because
torchao's ``nvfp4_quantize`` (and the NVIDIA quantize kernels it matches) does: dividing by
``s_t * s_b`` instead can land on the other side of a rounding tie. ``s_t = 1`` for an all-zero
tensor (torchao would divide 0 by 0 there).

``keep_dims`` names the dimensions that get a tensor scale each: none for a weight (one scale, as
NVIDIA's checkpoints hold), the batch for an activation (a batch never shares statistics), batch and
token for K/V (B, H, T, D), so a token's codes never depend on other tokens and a cache that stores
one token at a time quantizes exactly as one that stores the prompt at once (padding included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qeval.quant.formats import e2m1
from qeval.quant.formats.mx import blocks

BLOCK = 16
E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)      # 448
E4M3_TINY = float(torch.finfo(E4M3).tiny)    # 2**-6, the smallest normal
TENSOR_SCALE_BYTES = 4


@dataclass(frozen=True)
class NVFP4Params:
    """``codes``: (..., K // 16, 16) uint8 E2M1 codes; ``block_scale``: (..., K // 16, 1)
    float8_e4m3fn; ``tensor_scale``: float32, (1, ..., 1) or (B, 1, ..., 1) broadcasting on
    ``codes``."""

    codes: torch.Tensor
    block_scale: torch.Tensor
    tensor_scale: torch.Tensor


def tensor_scale(x: torch.Tensor, keep_dims: tuple[int, ...] = ()) -> torch.Tensor:
    """float32 ``amax / (448 * 6)`` over every dimension but ``keep_dims``, shaped to broadcast on
    ``x``'s blocked view ``(..., K // 16, 16)``."""
    keep = {d % x.dim() for d in keep_dims}
    dims = [d for d in range(x.dim()) if d not in keep]
    s = x.abs().float().amax(dim=dims, keepdim=True) / (E4M3_MAX * e2m1.MAX)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s.unsqueeze(-1)


def quantize(x: torch.Tensor, keep_dims: tuple[int, ...] = ()) -> NVFP4Params:
    """Blocks of 16 along the last axis -> E2M1 codes, E4M3 block scales and the tensor scale(s)."""
    s_t = tensor_scale(x, keep_dims)
    xb = blocks(x.float(), BLOCK)
    block_amax = xb.abs().amax(-1, keepdim=True)
    s_b = (block_amax / e2m1.MAX / s_t).clamp(E4M3_TINY, E4M3_MAX).to(E4M3)
    y = xb * ((1.0 / s_t) / s_b.float())
    return NVFP4Params(e2m1.to_codes(e2m1.round_to_grid(y)), s_b, s_t)


def dequantize(q: NVFP4Params, dtype: torch.dtype) -> torch.Tensor:
    """(..., K // 16, 16) codes -> (..., K) in ``dtype``."""
    return (e2m1.from_codes(q.codes) * (q.tensor_scale * q.block_scale.float())).flatten(-2).to(dtype)


def fake_quantize(x: torch.Tensor, keep_dims: tuple[int, ...] = ()) -> torch.Tensor:
    return dequantize(quantize(x, keep_dims), x.dtype)


def packed_bytes(n_elements: int, n_tensor_scales: int = 1) -> int:
    """Two E2M1 codes per byte, one E4M3 byte per block of 16, a float32 per tensor scale."""
    return -(-n_elements // 2) + -(-n_elements // BLOCK) + TENSOR_SCALE_BYTES * n_tensor_scales
