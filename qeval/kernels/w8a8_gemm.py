"""W8A8: int8 activations (per token, dynamic) x int8 weights (per output channel), int8 tensor cores.

With ``x[m, k] ~= sx[m] * q[m, k] + zx[m]`` from :mod:`qeval.kernels.act_quant` and
``w[n, k] ~= s[n] * c[n, k] + z[n]`` (signed codes, zero folded the same way), the product splits
into one exact integer matmul and rank-1 corrections:

    out[m, n] = sx[m] * (s[n] * sum_k q c  +  z[n] * sum_k q)  +  zx[m] * wsum[n]

where ``wsum[n] = sum_k w[n, k]`` (the dequantized row sum) is computed once at load time, so an
asymmetric activation (Qllm-Eval's per-token min-max) costs one row sum, not a float matmul. The
int32 accumulator is exact (|q c| <= 2**14, so K up to 2**17 cannot overflow). SmoothQuant's
W8A8 (arXiv 2211.10438) is the symmetric special case, ``zx = z = 0``.
Reference: :func:`w8a8_matmul_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qeval.kernels import _env  # noqa: F401  (interpreter choice before @triton.jit)
from qeval.kernels.act_quant import quantize_per_token, quantize_per_token_reference
from qeval.quant.packed import PackedWeight


@dataclass
class Int8Weight:
    """A per-channel quantized weight held as signed int8 codes, K-major for the GEMM."""

    codes: torch.Tensor    # (K, N) int8: code - 2**(bits-1) (asymmetric) or the signed code
    scale: torch.Tensor    # (N,) float32
    zero: torch.Tensor     # (N,) float32, folded: w = scale * codes + zero
    wsum: torch.Tensor     # (N,) float32, sum over K of the dequantized weight
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes + self.wsum.nbytes

    @classmethod
    def from_packed(cls, p: PackedWeight) -> "Int8Weight":
        """From a one-group-per-channel :class:`PackedWeight` (G = K) of at most 8 bits."""
        if p.group_size != p.in_features:
            raise ValueError(f"W8A8 needs one group per output channel, got group_size={p.group_size}")
        half = 2 ** (p.bits - 1)
        codes = (p.codes() - half).to(torch.int8)                   # (N, K)
        scale = p.scale[0].float()
        zero = p.zero[0].float() + (half - p.offset) * scale
        wsum = scale * codes.float().sum(1) + p.in_features * zero  # (N,)
        return cls(codes.t().contiguous(), scale, zero, wsum, p.in_features, p.out_features)


@triton.jit
def store_a8_output(inner, sx_ptr, zx_ptr, wsum_ptr, b_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, N,
                    HAS_BIAS: tl.constexpr):
    """The epilogue every int8-activation GEMM shares: ``inner`` (BLOCK_M, BLOCK_N) float32 is
    sum_k q_x * w_dequant; the activation's per-token scale and folded zero turn it into x @ W
    (``sx * inner + zx * sum_k w``), then bias, cast and store."""
    sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
    zx = tl.load(zx_ptr + offs_m, mask=m_mask, other=0.0)
    wsum = tl.load(wsum_ptr + offs_n, mask=n_mask, other=0.0)
    out = sx[:, None] * inner + zx[:, None] * wsum[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    # 64-bit row offsets: M * N passes 2**31 in a long prefill
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _w8a8_kernel(
    q_ptr,        # (M, K) int8 activation codes
    sx_ptr,       # (M,) float32 activation scale
    zx_ptr,       # (M,) float32 activation zero (folded)
    c_ptr,        # (K, N) int8 weight codes
    s_ptr,        # (N,) float32 weight scale
    z_ptr,        # (N,) float32 weight zero (folded)
    wsum_ptr,     # (N,) float32 dequantized weight row sums
    b_ptr,        # (N,) bias in any float dtype (read only when HAS_BIAS)
    out_ptr,      # (M, N) output dtype
    M, N, K,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)   # M * K passes 2**31 in a long prefill: 64-bit offsets
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    qsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        q = tl.load(q_ptr + rows[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
        c = tl.load(c_ptr + offs_k[:, None] * N + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(q, c, acc)
        qsum += tl.sum(q.to(tl.int32), axis=1)
    s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    z = tl.load(z_ptr + offs_n, mask=n_mask, other=0.0)
    inner = acc.to(tl.float32) * s[None, :] + qsum.to(tl.float32)[:, None] * z[None, :]
    store_a8_output(inner, sx_ptr, zx_ptr, wsum_ptr, b_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, N, HAS_BIAS)


def w8a8_matmul(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None, a_bits: int = 8,
                a_symmetric: bool = False) -> torch.Tensor:
    """x (..., K) float -> per-token int8 codes -> (..., N) in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)   # (..., K) -> (M, K)
    q, sx, zx = quantize_per_token(x2, a_bits, a_symmetric)
    m, k, n = x2.shape[0], w.in_features, w.out_features
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    block_m, block_n, block_k = (16, 64, 128) if m <= 16 else (64, 64, 64)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _w8a8_kernel[grid](q, sx, zx, w.codes, w.scale, w.zero, w.wsum, bias if bias is not None else w.scale,
                       out, m, n, k, HAS_BIAS=bias is not None,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.reshape(*lead, n)


def w8a8_matmul_reference(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None,
                          a_bits: int = 8, a_symmetric: bool = False) -> torch.Tensor:
    """Torch reference: dequantize both operands in float32, matmul, cast."""
    x2 = x.reshape(-1, w.in_features)
    q, sx, zx = quantize_per_token_reference(x2, a_bits, a_symmetric)
    xd = sx[:, None] * q.float() + zx[:, None]                     # (M, K)
    wd = w.scale * w.codes.float() + w.zero                        # (K, N)
    out = xd @ wd + (0 if bias is None else bias.float())
    return out.to(x.dtype).reshape(*x.shape[:-1], w.out_features)
