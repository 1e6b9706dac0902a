"""W4A8 (and any 2-8 bit weight in groups) x per-token int8 activations, int8 tensor cores.

The weight stays packed (:class:`qeval.quant.packed.PackedWeight`, groups of G along K); each tile
of words is loaded once and unpacked in registers with shifts and masks to signed int8
(``code - 2**(bits-1)``, one byte per code where the load-per-code layout staged four), then
multiplied with the int8 activation codes. Group scales cannot enter an integer accumulator, so the K loop runs group by
group (QServe's "per-group" W4A8 scheme, arXiv 2405.04532): an exact int32 dot over one group, then

    acc[m, n] += s[g, n] * sum_{k in g} q c  +  z[g, n] * sum_{k in g} q
    out[m, n]  = sx[m] * acc[m, n] + zx[m] * wsum[n]

with the zeros folded for signed codes and ``wsum[n] = sum_k w[n, k]`` computed once at load
time (see :mod:`qeval.kernels.w8a8_gemm` for the algebra). Reference: :func:`w4a8_matmul_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qeval.kernels import _env  # noqa: F401  (interpreter choice before @triton.jit)
from qeval.kernels.act_quant import quantize_per_token, quantize_per_token_reference
from qeval.quant.packed import PackedWeight, codes_per_word
from qeval.kernels.w8a8_gemm import store_a8_output


@dataclass
class GroupedInt8Weight:
    """A packed weight plus the folded zeros and row sums the integer GEMM needs."""

    packed: PackedWeight   # words (ceil(K / C), N) int32, scale (K // G, N)
    zero: torch.Tensor     # (K // G, N) float32, folded for signed codes: w = scale * (code - half) + zero
    wsum: torch.Tensor     # (N,) float32, sum over K of the dequantized weight

    @property
    def nbytes(self) -> int:
        # the packed weight's own zeros are replaced by the folded ones, not held twice
        p = self.packed
        return p.words.nbytes + p.scale.nbytes + self.zero.nbytes + self.wsum.nbytes

    @classmethod
    def from_packed(cls, p: PackedWeight) -> "GroupedInt8Weight":
        half = 2 ** (p.bits - 1)
        zero = p.zero.float() + (half - p.offset) * p.scale.float()          # (K // G, N)
        # (N, K) -> (N, K // G, G): dequantized row sums in the folded form the kernel uses
        codes = (p.codes() - half).float().reshape(p.out_features, -1, p.group_size)
        wsum = (codes.sum(-1) * p.scale.float().t() + p.group_size * zero.t()).sum(-1)
        slim = PackedWeight(p.words, p.scale, p.zero[:0], p.bits, p.group_size, p.in_features,
                            p.out_features, p.offset)
        return cls(slim, zero.contiguous(), wsum)


@triton.jit
def _w4a8_kernel(
    q_ptr,        # (M, K) int8 activation codes
    sx_ptr,       # (M,) float32 activation scale
    zx_ptr,       # (M,) float32 activation zero (folded)
    w_ptr,        # (ceil(K / CPW), N) int32 packed weight codes
    s_ptr,        # (K // G, N) weight scale
    z_ptr,        # (K // G, N) float32 weight zero (folded)
    wsum_ptr,     # (N,) float32
    b_ptr,        # (N,) bias (read only when HAS_BIAS)
    out_ptr,      # (M, N) output dtype
    M, N, K, G,
    BITS: tl.constexpr, CPW: tl.constexpr, CPW_P2: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)   # M * K passes 2**31 in a long prefill: 64-bit offsets
    # unpacked row r = word * CPW_P2 + j holds code j of its word (input k = word * CPW + j);
    # rows with j >= CPW repeat code CPW - 1 (no shift past bit 31) and meet zero activations
    j = tl.minimum(tl.arange(0, CPW_P2), CPW - 1)
    r = tl.arange(0, BLOCK_KW * CPW_P2)
    r_k = (r // CPW_P2) * CPW + r % CPW_P2
    r_real = r % CPW_P2 < CPW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // G):
        dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        qsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        # the words holding group g; with C not dividing G a boundary word is read by both groups
        for w0 in range(g * G // CPW, tl.cdiv((g + 1) * G, CPW), BLOCK_KW):
            offs_w = w0 + tl.arange(0, BLOCK_KW)
            # each word once, as packed int32 (no per-code gather)
            words = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :],
                            mask=(offs_w < tl.cdiv(K, CPW))[:, None] & n_mask[None, :], other=0)
            offs_k = w0 * CPW + r_k
            k_ok = r_real & (offs_k >= g * G) & (offs_k < (g + 1) * G)
            q = tl.load(q_ptr + rows[:, None] * K + offs_k[None, :],
                        mask=m_mask[:, None] & k_ok[None, :], other=0)
            # (BLOCK_KW, BLOCK_N) -> (BLOCK_KW, CPW_P2, BLOCK_N) -> (BLOCK_KW * CPW_P2, BLOCK_N):
            # shifts and a mask in registers; codes outside the group meet q = 0
            codes = (words[:, None, :] >> (j * BITS)[None, :, None]) & ((1 << BITS) - 1)
            c = tl.reshape((codes - (1 << (BITS - 1))).to(tl.int8), (BLOCK_KW * CPW_P2, BLOCK_N))
            dot = tl.dot(q, c, dot)
            qsum += tl.sum(q.to(tl.int32), axis=1)
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0)
        acc += dot.to(tl.float32) * s[None, :] + qsum.to(tl.float32)[:, None] * z[None, :]
    store_a8_output(acc, sx_ptr, zx_ptr, wsum_ptr, b_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, N, HAS_BIAS)


def w4a8_matmul(x: torch.Tensor, w: GroupedInt8Weight, bias: torch.Tensor | None = None, a_bits: int = 8,
                a_symmetric: bool = False) -> torch.Tensor:
    """x (..., K) float -> per-token int8 codes -> (..., N) in x's dtype."""
    p = w.packed
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.in_features)   # (..., K) -> (M, K)
    q, sx, zx = quantize_per_token(x2, a_bits, a_symmetric)
    m, k, n = x2.shape[0], p.in_features, p.out_features
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    block_m, block_n = (16, 64) if m <= 16 else (64, 64)
    cpw = codes_per_word(p.bits)
    cpw_p2 = triton.next_power_of_2(cpw)
    # the words of one group, unpacked to K = BLOCK_KW * CPW_P2 in [32, 128]: int8 mma takes
    # K >= 32 per step, and a longer tile would only add masked codes past the group's end
    block_kw = triton.next_power_of_2(triton.cdiv(p.group_size, cpw))
    block_kw = max(32 // cpw_p2, min(128 // cpw_p2, block_kw))
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _w4a8_kernel[grid](q, sx, zx, p.words, p.scale, w.zero, w.wsum, bias if bias is not None else w.wsum,
                       out, m, n, k, p.group_size, BITS=p.bits, CPW=cpw, CPW_P2=cpw_p2,
                       HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KW=block_kw)
    return out.reshape(*lead, n)


def w4a8_matmul_reference(x: torch.Tensor, w: GroupedInt8Weight, bias: torch.Tensor | None = None,
                          a_bits: int = 8, a_symmetric: bool = False) -> torch.Tensor:
    """Torch reference: dequantize both operands in float32, matmul, cast."""
    p = w.packed
    x2 = x.reshape(-1, p.in_features)
    q, sx, zx = quantize_per_token_reference(x2, a_bits, a_symmetric)
    xd = sx[:, None] * q.float() + zx[:, None]                                     # (M, K)
    half = 2 ** (p.bits - 1)
    # (K // G, N) -> (N, K)
    scale = p.scale.float().t().repeat_interleave(p.group_size, dim=1)
    zero = w.zero.t().repeat_interleave(p.group_size, dim=1)
    wd = (p.codes() - half).float() * scale + zero                                 # (N, K)
    out = xd @ wd.t() + (0 if bias is None else bias.float())
    return out.to(x.dtype).reshape(*x.shape[:-1], p.out_features)
