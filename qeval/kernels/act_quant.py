"""Per-token dynamic activation quantization to int8 codes for the W8A8 / W4A8 GEMMs.

Same numerics as :func:`qeval.quant.quantize` with ``axis=-1, group_size=None`` (per token, min-max,
``2**bits - 1`` levels, guarded scale, round half to even like ``torch.round``), so the integer
codes equal the reference exactly. The GEMMs want signed int8 operands for the tensor cores, so an
asymmetric code ``c`` in ``[0, 2**bits - 1]`` is returned as ``c - 2**(bits-1)`` with the zero
folded accordingly: ``x ~= scale * q + zero`` with

    asymmetric: zero = min + 2**(bits-1) * scale        symmetric: zero = 0

Each program takes 8 tokens and makes two passes over their K values (statistics, then codes): x is read twice
and 1 byte per element written, the producer's output never round-trips in float.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qeval.kernels import _env  # noqa: F401  (interpreter choice before @triton.jit)
from qeval.quant.primitives import quantize


@triton.jit
def _round_half_even(v):
    f = tl.floor(v)
    d = v - f
    odd = f - 2.0 * tl.floor(f * 0.5)   # 1.0 when f is odd
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))


@triton.jit
def _act_quant_kernel(
    x_ptr,        # (M, K) float, row stride stride_xm
    q_ptr,        # (M, K) int8 signed codes
    s_ptr,        # (M,) float32 scale
    z_ptr,        # (M,) float32 folded zero
    M, K, stride_xm,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_mask = rows < M
    r64 = rows.to(tl.int64)   # M * K passes 2**31 in a long prefill: 64-bit offsets
    lo_v = tl.full((ROWS, BLOCK_K), float("inf"), tl.float32)
    hi_v = tl.full((ROWS, BLOCK_K), float("-inf"), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = r_mask[:, None] & (offs < K)[None, :]
        x = tl.load(x_ptr + r64[:, None] * stride_xm + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        lo_v = tl.minimum(lo_v, tl.where(mask, x, float("inf")))
        hi_v = tl.maximum(hi_v, tl.where(mask, x, float("-inf")))
    # rows past M have no values: give them a zero range so no inf - inf is ever formed
    lo = tl.where(r_mask, tl.min(lo_v, axis=1), 0.0)     # (ROWS,)
    hi = tl.where(r_mask, tl.max(hi_v, axis=1), 0.0)
    if SYMMETRIC:
        qmax: tl.constexpr = 2 ** (BITS - 1) - 1
        scale = tl.math.div_rn(tl.maximum(tl.abs(hi), tl.abs(lo)), tl.full((ROWS,), qmax, tl.float32))
        scale = tl.where(scale == 0.0, 1.0, scale)
        base = tl.zeros((ROWS,), tl.float32)
        zero = tl.zeros((ROWS,), tl.float32)
        q_lo = -qmax - 1.0
        shift = 0.0
    else:
        qmax: tl.constexpr = 2**BITS - 1
        scale = tl.math.div_rn(hi - lo, tl.full((ROWS,), qmax, tl.float32))
        scale = tl.where(scale == 0.0, 1.0, scale)
        base = lo
        half = 2.0 ** (BITS - 1)
        zero = lo + half * scale
        q_lo = 0.0
        shift = half
    q_hi = qmax * 1.0
    tl.store(s_ptr + rows, scale, mask=r_mask)
    tl.store(z_ptr + rows, zero, mask=r_mask)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = r_mask[:, None] & (offs < K)[None, :]
        x = tl.load(x_ptr + r64[:, None] * stride_xm + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        c = _round_half_even(tl.math.div_rn(x - base[:, None], scale[:, None]))
        c = tl.minimum(tl.maximum(c, q_lo), q_hi) - shift
        tl.store(q_ptr + r64[:, None] * K + offs[None, :], c.to(tl.int8), mask=mask)


def quantize_per_token(x: torch.Tensor, bits: int = 8, symmetric: bool = False):
    """(M, K) float -> (q (M, K) int8, scale (M,) float32, zero (M,) float32)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: int8 activation codes hold 2-8 bits")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=torch.int8)
    scale = torch.empty(m, device=x.device, dtype=torch.float32)
    zero = torch.empty(m, device=x.device, dtype=torch.float32)
    # 8 tokens per program: one row each would leave a decode step's few rows as 1-2 programs anyway
    rows = 8
    block_k = min(512, triton.next_power_of_2(k))
    _act_quant_kernel[(triton.cdiv(m, rows),)](x, q, scale, zero, m, k, x.stride(0), BITS=bits,
                                               SYMMETRIC=symmetric, ROWS=rows, BLOCK_K=block_k)
    return q, scale, zero


def quantize_per_token_reference(x: torch.Tensor, bits: int = 8, symmetric: bool = False):
    """Torch reference through :func:`qeval.quant.quantize`, in the kernel's signed-code form."""
    p = quantize(x, bits, -1, None, symmetric)
    # codes (M, 1, K), scale/zero (M, 1, 1)
    scale = p.scale.reshape(-1)
    if symmetric:
        return p.codes.reshape(x.shape).to(torch.int8), scale, torch.zeros_like(scale)
    half = 2 ** (bits - 1)
    return (p.codes.reshape(x.shape) - half).to(torch.int8), scale, p.zero.reshape(-1) + half * scale
