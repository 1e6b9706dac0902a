"""Weight-only GEMM / GEMV with b-bit packed weights, dequantization fused into the matmul.

``out (M, N) = x (M, K) @ dequant(W)^T`` where ``W`` is held as :class:`qeval.kernels.pack.PackedWeight`
(int32 words along K, asymmetric scale and zero per group of G inputs). Each program loads a
``(BLOCK_K, BLOCK_N)`` tile of words (one word row feeds C = 32 // bits codes), decodes it with one
shift and mask, dequantizes in float32 and feeds ``tl.dot`` in the activation's dtype, so the full
float weight never exists in memory: decode is bound by reading ``bits / 8 + 4 / G`` bytes per
weight instead of 2 (the ceiling is about 3.6x fp16 at 4 bits, G = 128).

Two configurations of one kernel:
- decode (M <= 16, batch 1-16 generation): BLOCK_M = 16 (``tl.dot`` needs M >= 16, so batch 1 is
  padded by the mask) and split-K, because a GEMV has only N / BLOCK_N output tiles, too few to fill
  the GPU; partial sums go to a (SPLIT_K, M, N) float32 buffer reduced in torch (deterministic,
  unlike atomics, so greedy generations are reproducible).
- prefill (M > 16): 64 x 64 tiles, no split.
Reference: :func:`wq_matmul_reference` (dequantize then matmul).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qeval.kernels import _env  # noqa: F401  (interpreter choice before @triton.jit)
from qeval.kernels.pack import PackedWeight, codes_per_word, dequantize_packed

DECODE_MAX_M = 16


@triton.jit
def _wq_gemm_kernel(
    x_ptr,        # (M, K) float16 | bfloat16 | float32, row stride stride_xm, unit column stride
    w_ptr,        # (ceil(K / CPW), N) int32 packed codes
    s_ptr,        # (K // G, N) scale
    z_ptr,        # (K // G, N) zero
    out_ptr,      # (SPLIT_K, M, N) float32 partial sums
    M, N, K, G, K_PER_SPLIT, stride_xm,
    BITS: tl.constexpr, CPW: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SCALE_PER_BLOCK: tl.constexpr,   # G % BLOCK_K == 0: a K block lies inside one group
    IEEE_DOT: tl.constexpr,          # float32 inputs: no TF32 rounding
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)   # M * K and M * N pass 2**31 in a long prefill: 64-bit offsets
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wk_mask = k_mask[:, None] & n_mask[None, :]
        # each word row is read by CPW consecutive k: the repeats hit L1, DRAM sees the packed bytes
        words = tl.load(w_ptr + (offs_k // CPW)[:, None] * N + offs_n[None, :], mask=wk_mask, other=0)
        codes = (words >> ((offs_k % CPW) * BITS)[:, None]) & ((1 << BITS) - 1)
        if SCALE_PER_BLOCK:
            g = k0 // G
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        else:
            g_off = (offs_k // G)[:, None] * N + offs_n[None, :]
            s = tl.load(s_ptr + g_off, mask=wk_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g_off, mask=wk_mask, other=0.0).to(tl.float32)
        w = ((codes - OFFSET).to(tl.float32) * s + z).to(x.dtype)   # (BLOCK_K, BLOCK_N)
        if IEEE_DOT:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    out = out_ptr + (pid_k * M + rows)[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


def _block_k(group_size: int, k: int, cap: int) -> int:
    """Largest power of two <= cap dividing G (scales loaded once per block), else a gather path."""
    for b in (128, 64, 32, 16):
        if b <= cap and group_size % b == 0:
            return b
    return max(16, min(cap, triton.next_power_of_2(min(k, cap))))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def wq_matmul(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None,
              split_k: int | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(p)^T (+ bias) -> (..., N) in x's dtype."""
    if x.shape[-1] != p.in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {p.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.in_features)   # (..., K) -> (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k, n = x2.shape[0], p.in_features, p.out_features
    decode = m <= DECODE_MAX_M
    block_m, block_n = (16, 64) if decode else (64, 64)
    # float32 has no tensor-core path without TF32: the IEEE dot runs on FMA units with both
    # operand tiles in registers, so its K blocks are shorter (scripts/kernel_resources.py: 64 x 64
    # x 64 tiles spilled about 1.6 KB per thread, 16 x 64 x 128 about 0.5 KB; these spill nothing)
    cap = (32 if decode else 16) if x.dtype == torch.float32 else (128 if decode else 64)
    block_k = _block_k(p.group_size, k, cap)
    if split_k is None:
        tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
        # enough programs for two waves, never a split shorter than two K blocks
        split_k = 1 if not decode else max(1, min(2 * _num_sms(x.device) // tiles, k // (2 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    partial = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    _wq_gemm_kernel[grid](
        x2, p.words, p.scale, p.zero, partial, m, n, k, p.group_size, k_per_split, x2.stride(0),
        BITS=p.bits, CPW=codes_per_word(p.bits), OFFSET=p.offset,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        SCALE_PER_BLOCK=p.group_size % block_k == 0, IEEE_DOT=x.dtype == torch.float32)
    out = partial[0] if split_k == 1 else partial.sum(0)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, n)


def wq_matmul_reference(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: dequantize the whole weight, then one matmul (also the benchmarks' baseline)."""
    return torch.nn.functional.linear(x, dequantize_packed(p, x.dtype), bias)
