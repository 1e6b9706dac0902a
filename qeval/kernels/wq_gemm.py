"""Weight-only GEMM / GEMV with b-bit packed weights, dequantization fused into the matmul.

``out (M, N) = x (M, K) @ dequant(W)^T`` where ``W`` is held as :class:`qeval.quant.packed.PackedWeight`
(int32 words along K, C = 32 // bits codes per word, scale and zero per group of G inputs). Every
program loads each ``(BLOCK_KW, BLOCK_N)`` tile of words exactly once and unpacks it in registers
with shifts and masks (as Marlin, arXiv 2408.11743, and gemlite do), so the bytes that cross
L2 -> SM are the packed ones and no expanded tile is staged in shared memory: decode is bound by
reading ``bits / 8 + 4 / G`` bytes per weight instead of 2 (about 3.6x fp16 at 4 bits, G = 128).

Two kernels, picked by the number of rows M:
- GEMV (M <= GEMV_MAX_M, generation at batch 1-4; one row per program): no tensor cores. Code position j of every word
  is its own ``(BLOCK_KW, BLOCK_N)`` slice, multiplied by the activations at k = word * C + j (a
  strided load of a vector that stays in L1) and accumulated in float32 per thread; the K
  reduction happens once, inside the program, after the loop. Codes become floats by the
  ``2**23`` trick (:func:`code_to_float`) instead of the slow int -> float conversion unit, and the
  group scale is applied once per word row instead of once per code (both keep float32 results
  within rounding of the reference).
- GEMM (larger M, prefill and batched decode): the words tile is staged in shared memory as packed
  int32 (C / 2 times smaller than the fp16 tile) and read straight into the tensor-core operand layout; code
  position j of it is unpacked there and meets the activations at k = word * C + j in its own
  ``tl.dot`` with K = BLOCK_KW, so the expanded weight exists only in registers.

Split-K (the GEMV has only N / BLOCK_N output tiles, too few to fill the GPU): programs add their
partial sums atomically into a zeroed float32 output, so no second reduction kernel runs. Float
addition order then varies from run to run on a GPU, in the last bits of float32, so under
``torch.use_deterministic_algorithms(True)`` the launcher takes one split; with one split (every
prefill) the kernel writes the output, bias included, in the activation's dtype.
Reference: :func:`wq_matmul_reference` (dequantize then matmul).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qeval.kernels import _env  # noqa: F401  (interpreter choice before @triton.jit)
from qeval.quant.packed import PackedWeight, codes_per_word, dequantize_packed

GEMV_MAX_M = 4
DECODE_MAX_M = 16


@triton.jit
def code_to_float(codes, OFFSET: tl.constexpr):
    """int32 codes in [0, 2**23) -> float32 ``code - OFFSET``, exactly: the code's bits under the
    exponent of 2**23 form the float 2**23 + code (IEEE 754 binary32, 23-bit mantissa), and
    subtracting 2**23 + OFFSET is exact. One logic op and one add instead of an int -> float
    conversion, which issues 16 per clock per SM against 64-128 float32 FMAs on sm_80 / sm_90
    (CUDA C Programming Guide, "Arithmetic Instructions" throughput table)."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def store_or_add(acc, b_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, N,
                 HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    """Epilogue: bias (once: by the first K split), then a store in out's dtype or, with split-K,
    an atomic add into the zeroed float32 output."""
    if HAS_BIAS:  # noqa: SIM102  (a compile-time test around a run-time one)
        if tl.program_id(2) == 0:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    # 64-bit row offsets: M * N passes 2**31 in a long prefill
    out = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wq_gemv_kernel(
    x_ptr,        # (M, K) float16 | bfloat16 | float32, row stride stride_xm, unit column stride
    w_ptr,        # (ceil(K / CPW), N) int32 packed codes
    s_ptr,        # (K // G, N) scale
    z_ptr,        # (K // G, N) zero
    b_ptr,        # (N,) bias (read only when HAS_BIAS)
    out_ptr,      # (M, N) x's dtype, or float32 zeros added to when ATOMIC
    M, N, K, G, KW_PER_SPLIT, stride_xm,
    BITS: tl.constexpr, CPW: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    GROUP_BY_WORD: tl.constexpr,     # G % CPW == 0: the codes of one word share a group
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
):
    # one activation row per program: rows of one (n, k) tile run side by side and share the
    # words tile in L2, so DRAM still sees the packed bytes once
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)   # M * K passes 2**31 in a long prefill: 64-bit offsets
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_start = pid_k * KW_PER_SPLIT
    w_end = tl.minimum(w_start + KW_PER_SPLIT, tl.cdiv(K, CPW))
    # (BLOCK_KW, BLOCK_N): one partial sum per word row, reduced over K after the loop
    acc = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    for w0 in range(w_start, w_end, BLOCK_KW):
        offs_w = w0 + tl.arange(0, BLOCK_KW)
        wn_mask = (offs_w < w_end)[:, None] & n_mask[None, :]
        words = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :], mask=wn_mask, other=0)
        if GROUP_BY_WORD:
            g_off = (offs_w * CPW // G)[:, None] * N + offs_n[None, :]
            s = tl.load(s_ptr + g_off, mask=wn_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g_off, mask=wn_mask, other=0.0).to(tl.float32)
            dot_c = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)   # sum_j x (code - OFFSET)
            sum_x = tl.zeros((BLOCK_KW,), dtype=tl.float32)           # sum_j x
        for j in tl.static_range(CPW):
            offs_k = offs_w * CPW + j                                  # (BLOCK_KW,)
            x = tl.load(x_ptr + row * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            c = code_to_float((words >> (j * BITS)) & ((1 << BITS) - 1), OFFSET)
            if GROUP_BY_WORD:
                dot_c += x[:, None] * c
                sum_x += x
            else:
                g_off = (offs_k // G)[:, None] * N + offs_n[None, :]
                sz_mask = wn_mask & (offs_k < K)[:, None]
                s = tl.load(s_ptr + g_off, mask=sz_mask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g_off, mask=sz_mask, other=0.0).to(tl.float32)
                acc += x[:, None] * (c * s + z)
        if GROUP_BY_WORD:
            # sum_j x (c s + z) = s sum_j x c + z sum_j x: the scale once per word row
            acc += dot_c * s + sum_x[:, None] * z
    out = tl.sum(acc, axis=0)[None, :]                                 # (1, BLOCK_N)
    store_or_add(out, b_ptr, out_ptr, row + tl.arange(0, 1), offs_n, tl.full((1,), 1, tl.int1), n_mask,
                 N, HAS_BIAS, ATOMIC)


@triton.jit
def _wq_gemm_kernel(
    x_ptr,        # (M, K) float16 | bfloat16 | float32, row stride stride_xm, unit column stride
    w_ptr,        # (ceil(K / CPW), N) int32 packed codes
    s_ptr,        # (K // G, N) scale
    z_ptr,        # (K // G, N) zero
    b_ptr,        # (N,) bias (read only when HAS_BIAS)
    out_ptr,      # (M, N) x's dtype, or float32 zeros added to when ATOMIC
    M, N, K, G, KW_PER_SPLIT, stride_xm,
    BITS: tl.constexpr, CPW: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    SCALE_MODE: tl.constexpr,        # see scale_mode()
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    IEEE_DOT: tl.constexpr,          # float32 inputs: no TF32 rounding
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)   # M * K passes 2**31 in a long prefill: 64-bit offsets
    w_start = pid_k * KW_PER_SPLIT
    w_end = tl.minimum(w_start + KW_PER_SPLIT, tl.cdiv(K, CPW))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for w0 in range(w_start, w_end, BLOCK_KW):
        offs_w = w0 + tl.arange(0, BLOCK_KW)
        wn_mask = (offs_w < w_end)[:, None] & n_mask[None, :]
        # staged in shared memory as packed words, unpacked in the dot operand's registers
        words = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :], mask=wn_mask, other=0)
        g0 = w0 * CPW // G
        if SCALE_MODE == 1:
            s = tl.load(s_ptr + g0 * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g0 * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        elif SCALE_MODE == 2:
            g_off = (offs_w * CPW // G)[:, None] * N + offs_n[None, :]
            s = tl.load(s_ptr + g_off, mask=wn_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g_off, mask=wn_mask, other=0.0).to(tl.float32)
        elif SCALE_MODE == 3:
            # rows g0, g0 + 1, g0 + 2, clamped to the last group (a clamped row is never picked)
            g1 = tl.minimum(g0 + 1, K // G - 1)
            g2 = tl.minimum(g0 + 2, K // G - 1)
            s0 = tl.load(s_ptr + g0 * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            z0 = tl.load(z_ptr + g0 * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            s1 = tl.load(s_ptr + g1 * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            z1 = tl.load(z_ptr + g1 * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            s2 = tl.load(s_ptr + g2 * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            z2 = tl.load(z_ptr + g2 * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(CPW):
            offs_k = offs_w * CPW + j                                  # (BLOCK_KW,)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
            if SCALE_MODE == 3:
                g_rel = (offs_k // G - g0)[:, None]
                s = tl.where(g_rel == 0, s0, tl.where(g_rel == 1, s1, s2))
                z = tl.where(g_rel == 0, z0, tl.where(g_rel == 1, z1, z2))
            elif SCALE_MODE == 0:
                g_off = (offs_k // G)[:, None] * N + offs_n[None, :]
                sz_mask = wn_mask & (offs_k < K)[:, None]
                s = tl.load(s_ptr + g_off, mask=sz_mask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g_off, mask=sz_mask, other=0.0).to(tl.float32)
            c = code_to_float((words >> (j * BITS)) & ((1 << BITS) - 1), OFFSET)
            w = (c * s + z).to(x.dtype)
            if IEEE_DOT:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
    store_or_add(acc, b_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, N, HAS_BIAS, ATOMIC)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def scale_mode(group_size: int, cpw: int, block_kw: int) -> int:
    """How the GEMM kernel finds the group of each code in a tile of ``block_kw`` words:
    1: the tile lies in one group (one row of scales); 2: each word lies in one group (a row per
    word); 3: the tile touches at most three groups, picked per code from three rows; 0: a
    gather per code position (groups smaller than about a third of a tile)."""
    span = block_kw * cpw
    if group_size % span == 0:
        return 1
    if group_size % cpw == 0:
        return 2
    return 3 if -(-(span - 1) // group_size) + 1 <= 3 else 0


def _tiles(m: int, fp32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_KW, num_stages) for M rows (4 warps); scripts/kernel_resources.py prints what
    they cost in registers and shared memory."""
    if m <= GEMV_MAX_M:
        # 32 x 64 words: 8 KB in flight per program, 16 words per thread
        return 1, 64, 32, 3
    # BLOCK_KW is the K of each tl.dot (one per code position): 16, the smallest a GPU dot takes
    if m <= DECODE_MAX_M:
        return 16, 64, 16, 2   # 2 stages: 3 cost a 4-byte spill in the split-K epilogue on sm_80
    # float32: the IEEE dot runs on FMA units with both operands in registers, so a narrower tile
    return (32, 64, 16, 3) if fp32 else (64, 64, 16, 3)


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
    cpw = codes_per_word(p.bits)
    n_words = triton.cdiv(k, cpw)
    block_m, block_n, block_kw, stages = _tiles(m, x.dtype == torch.float32)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    if split_k is None:
        # decode: about 4 programs per SM so each SM has several in flight to cover DRAM latency,
        # never a split shorter than two K blocks; prefill has tiles enough. Under
        # torch.use_deterministic_algorithms(True) one split: atomics add in no fixed order
        split_k = 1 if m > DECODE_MAX_M or torch.are_deterministic_algorithms_enabled() else max(
            1, min(4 * _num_sms(x.device) // tiles, n_words // (2 * block_kw)))
    kw_per_split = triton.cdiv(triton.cdiv(n_words, split_k), block_kw) * block_kw
    split_k = triton.cdiv(n_words, kw_per_split)
    atomic = split_k > 1
    out = (torch.zeros if atomic else torch.empty)((m, n), device=x.device,
                                                   dtype=torch.float32 if atomic else x.dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    args = (x2, p.words, p.scale, p.zero, bias if bias is not None else out, out,
            m, n, k, p.group_size, kw_per_split, x2.stride(0))
    common = {"BITS": p.bits, "CPW": cpw, "OFFSET": p.offset, "BLOCK_N": block_n, "BLOCK_KW": block_kw,
              "HAS_BIAS": bias is not None, "ATOMIC": atomic, "num_stages": stages}
    if m <= GEMV_MAX_M:
        _wq_gemv_kernel[grid](*args, GROUP_BY_WORD=p.group_size % cpw == 0, **common)
    else:
        _wq_gemm_kernel[grid](*args, BLOCK_M=block_m, SCALE_MODE=scale_mode(p.group_size, cpw, block_kw),
                              IEEE_DOT=x.dtype == torch.float32, **common)
    return out.to(x.dtype).reshape(*lead, n)


def wq_matmul_reference(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: dequantize the whole weight, then one matmul (also the benchmarks' baseline)."""
    return torch.nn.functional.linear(x, dequantize_packed(p, x.dtype), bias)
