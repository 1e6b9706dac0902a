"""Fused decode attention over a packed low-bit KV cache plus its full-precision residual.

One decode query per sequence attends to ``T`` positions: the first ``TK_Q`` keys and ``TV_Q``
values live as int32 words in KIVI's layout (:mod:`qeval.kernels.kv_pack`; arXiv:2402.02750), the
rest in full-precision residual tensors (KIVI keeps keys in full precision until R of them fill a
block, and values in a sliding window of the last R tokens, so ``TK_Q != TV_Q`` in general).

The kernel reads every byte of the cache once; the physical limit is bytes / bandwidth, which a
memory-bound kernel reaches with enough loads in flight. Choices (resources per compiled
specialisation: ``scripts/kernel_resources.py``):

- one program holds the query heads of a GQA group (``BLOCK_H``: the group rounded up to a power
  of two, never padded to 16), so a KV word is read once per group, not once per query head;
- contractions put the tokens on the MMA's rows: ``s^T = k @ q^T`` and ``o^T = v^T @ p^T``, so the
  query heads are the MMA's columns (n = 8 per instruction), and for one head (MHA) a broadcast
  multiply and reduce replaces the MMA (:mod:`qeval.kernels.kv_decode_tiles`);
- tiles of ``BLOCK_T`` tokens (16 at head_dim 128, 32 at 64; it divides G) lie in one key group;
  keys and values are dequantized in registers, with scales loaded as vectors (a key group's (D,)
  scale, a (BLOCK_T, D // G) tile of value scales) and broadcast over their channels;
- one loop without branches: packed and residual loads are unconditional and masked, so Triton's
  software pipeliner turns them into asynchronous copies ``NUM_STAGES`` tiles ahead;
- at most 168 registers per thread at 4 warps (3 resident programs per SM) and no spills, on
  sm_80 and sm_90 (``tests/test_kernels_compile.py``);
- split-KV: programs ``(batch * kv_head, split)`` each run an online softmax over a slice of
  tiles and write (max, sum, unnormalized output); a second small kernel merges the slices, so
  long contexts fill the GPU even at batch 1.

Rows are ragged: row ``b`` holds ``lengths[b]`` positions, its first ``k_quantized[b]`` keys and
``v_quantized[b]`` values packed (buffers may have spare capacity), the rest at the start of the
residual tensors. A left-padded batch is stored with each row's padding stripped.

Methods that correct the packed keys and values (GEAR's sparse outliers and low rank) compose with
the kernel instead of living in it: ``k_bias`` adds a per-position term to the packed keys' scores
before the softmax, and ``scores_out`` / ``lse_out`` hand back the final scores and log-sum-exp, so
the caller forms the probabilities it needs for its value corrections. All three are optional;
without them the kernel runs exactly the code it runs for KIVI.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from qeval.kernels._env import INTERPRETING
from qeval.kernels.kv_decode_tiles import (
    DOT_MIN_GROUP,
    bias_and_record,
    packed_keys,
    packed_values,
    scores,
    softmax_step,
    weighted_values,
)
from qeval.kernels.kv_pack import check_layout, codes_per_word

LOG2E = 1.4426950408889634
# (BLOCK_T, head_dim) tile elements: 16 fp32 values per thread at 4 warps. Twice that (32 tokens
# at head_dim 128) measured 240 registers for MHA on sm_90 and 167 with GEAR's extras on sm_80
TILE_ELEMENTS = 2048
NUM_WARPS = 4
NUM_STAGES = 3              # tiles of loads in flight per program (cp.async into shared memory)
MIN_RESIDENT_CTAS = 3       # the register budget: 3 CTAs of 128 threads per SM
# a split writes a (group, D) fp32 partial the merge reads back: 4 KB at group 4, D 128, next to
# about 12 KB of 2-bit K/V with scales per 128 tokens
MIN_SPLIT_TOKENS = 128


@triton.jit
def _decode_split_kernel(
    q_ptr,        # (B, Hq, D) activation dtype, strides (sq_b, sq_h, 1)
    kw_ptr,       # (B*Hkv, CAP_K // FPI_K, D) int32: packed keys
    ks_ptr, kz_ptr,   # (B*Hkv, CAP_K // G, D): key scale / zero
    vw_ptr,       # (B*Hkv, CAP_V, D // FPI_V) int32: packed values
    vs_ptr, vz_ptr,   # (B*Hkv, CAP_V, D // G): value scale / zero
    kr_ptr,       # (B, Hkv, >= len - TK_Q, D) residual keys, strides (skr_b, skr_h, skr_t, 1)
    vr_ptr,       # (B, Hkv, >= len - TV_Q, D) residual values, strides (svr_b, svr_h, svr_t, 1)
    rows_ptr,     # (B, 5) int32: per row (length, TK_Q packed keys, TV_Q packed values,
                  #   index of the row's first residual key, of its first residual value)
    pm_ptr, pl_ptr,   # (B*Hq, S) fp32: running max (log2 units) and sum per split
    pacc_ptr,     # (B*Hq, S, D) fp32: unnormalized output per split
    kb_ptr,       # (B, Hq, >= TK_Q) fp32 score bias of packed keys, strides (skb_b, skb_h, 1); if HAS_BIAS
    sc_ptr,       # (B, Hq, >= T) fp32 final scores (log2 units), strides (ssc_b, ssc_h, 1); if WRITE_SCORES
    Hkv, D, CAP_K, CAP_V, qk_scale, bias_scale, tiles_per_split,
    sq_b, sq_h, skr_b, skr_h, skr_t, svr_b, svr_h, svr_t, skb_b, skb_h, ssc_b, ssc_h,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, G: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_NG: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, WRITE_SCORES: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = bh // Hkv
    kvh = bh % Hkv
    FPI_K: tl.constexpr = 32 // K_BITS
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    tt = tl.arange(0, BLOCK_T)
    hmask = h < GROUP
    dmask = d < D
    q = tl.load(q_ptr + b * sq_b + (kvh * GROUP + h)[:, None] * sq_h + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if USE_DOT:   # the MMA operand, converted once
        q = q.to(DOT_DTYPE)
    T = tl.load(rows_ptr + b * 5)
    TK_Q = tl.load(rows_ptr + b * 5 + 1)
    TV_Q = tl.load(rows_ptr + b * 5 + 2)
    K_OFF = tl.load(rows_ptr + b * 5 + 3)
    V_OFF = tl.load(rows_ptr + b * 5 + 4)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    n_wv = D // (32 // V_BITS)
    n_gv = D // G
    kw_head = kw_ptr + bh * (CAP_K // FPI_K) * D
    ks_head = ks_ptr + bh * (CAP_K // G) * D
    kz_head = kz_ptr + bh * (CAP_K // G) * D
    vw_head = vw_ptr + bh * CAP_V * n_wv
    vs_head = vs_ptr + bh * CAP_V * n_gv
    vz_head = vz_ptr + bh * CAP_V * n_gv
    hq = kvh * GROUP + h
    kb_rows = kb_ptr + b * skb_b + hq[:, None] * skb_h
    sc_rows = sc_ptr + b * ssc_b + hq[:, None] * ssc_h
    n_tiles = tl.cdiv(T, BLOCK_T)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    kr_head = kr_ptr + b * skr_b + kvh * skr_h
    vr_head = vr_ptr + b * svr_b + kvh * svr_h
    # one loop without branches: every load is unconditional and masked (a masked-off load moves
    # no bytes), so the software pipeliner keeps NUM_STAGES tiles of loads in flight; a tile's
    # keys are all packed or all residual (TK_Q is a multiple of G, G of BLOCK_T), its values
    # may straddle TV_Q
    for tile in tl.range(tile_lo, tile_hi, num_stages=NUM_STAGES):
        t0 = tile * BLOCK_T
        t = t0 + tt
        valid = t < T
        k_packed = t0 < TK_Q
        k = packed_keys(kw_head + (t0 // FPI_K) * D, ks_head + (t0 // G) * D,
                        kz_head + (t0 // G) * D, tl.where(k_packed, D, 0), D, d, K_BITS,
                        BLOCK_T, BLOCK_D)
        k_res = tl.load(kr_head + (t - TK_Q + K_OFF)[:, None] * skr_t + d[None, :],
                        mask=(valid & (t >= TK_Q))[:, None] & dmask[None, :], other=0.0)
        k = tl.where(k_packed, k, k_res.to(tl.float32))
        s = scores(q, k, DOT_DTYPE, DOT_PRECISION, USE_DOT)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        s = bias_and_record(s, t, TK_Q, kb_rows, sc_rows, hmask, valid, bias_scale,
                            HAS_BIAS, WRITE_SCORES)
        p, m_i, l_i, acc = softmax_step(s, m_i, l_i, acc)
        v_packed = t < TV_Q
        v = packed_values(vw_head, vs_head, vz_head, t, v_packed, n_wv, n_gv, V_BITS, BLOCK_T,
                          BLOCK_NG, G)
        v_res = tl.load(vr_head + (t - TV_Q + V_OFF)[:, None] * svr_t + d[None, :],
                        mask=(valid & (t >= TV_Q))[:, None] & dmask[None, :], other=0.0)
        v = tl.where(v_packed[:, None], v, v_res.to(tl.float32))
        acc += weighted_values(p, v, DOT_DTYPE, DOT_PRECISION, USE_DOT)

    row = bh * GROUP + h   # = b * Hq + kvh * GROUP + h
    tl.store(pm_ptr + row * n_splits + split, m_i, mask=hmask)
    tl.store(pl_ptr + row * n_splits + split, l_i, mask=hmask)
    tl.store(pacc_ptr + (row * n_splits + split)[:, None] * D + d[None, :], acc,
             mask=hmask[:, None] & dmask[None, :])


@triton.jit
def _merge_splits_kernel(
    pm_ptr, pl_ptr,   # (B*Hq, S) fp32
    pacc_ptr,     # (B*Hq, S, D) fp32
    out_ptr,      # (B, Hq, D) output dtype, strides (so_b, so_h, 1)
    lse_ptr,      # (B, Hq) fp32 log-sum-exp of the scores (log2 units), strides (sl_b, sl_h); if WRITE_LSE
    Hq, S, D, so_b, so_h, sl_b, sl_h,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    row = tl.program_id(0)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = sp < S
    m = tl.load(pm_ptr + row * S + sp, mask=smask, other=float("-inf"))
    l = tl.load(pl_ptr + row * S + sp, mask=smask, other=0.0)
    acc = tl.load(pacc_ptr + (row * S + sp)[:, None] * D + d[None, :],
                  mask=smask[:, None] & (d < D)[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)                     # empty splits (m = -inf) weigh 0
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    b = row // Hq
    hq = row % Hq
    tl.store(out_ptr + b * so_b + hq * so_h + d, o.to(out_ptr.dtype.element_ty), mask=d < D)
    if WRITE_LSE:
        tl.store(lse_ptr + b * sl_b + hq * sl_h, m_max + tl.log2(tl.sum(l * w, axis=0)))


_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# plain integer helpers for the launcher: triton.cdiv and triton.next_power_of_2 are jit-wrapped
# and cost microseconds per host call, a decode step's budget being tens of microseconds
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=256)
def tile_shape(group: int, head_dim: int, group_size: int) -> tuple[int, int, bool]:
    """(BLOCK_H, BLOCK_T, USE_DOT) for a GQA group of ``group`` query heads: BLOCK_H is the group
    rounded up to a power of two; BLOCK_T keeps a (BLOCK_T, BLOCK_D) tile at TILE_ELEMENTS, divides
    G (a tile lies in one key group) and is at least 16, one word row of 2-bit keys; tensor cores
    from DOT_MIN_GROUP heads on (:mod:`qeval.kernels.kv_decode_tiles`)."""
    block_d = max(16, _pow2(head_dim))
    block_t = min(group_size, max(16, TILE_ELEMENTS // block_d))
    return _pow2(group), block_t, group >= DOT_MIN_GROUP


def split_count(batch_heads: int, n_tiles: int, block_t: int, sms: int) -> int:
    """Splits so that the grid holds MIN_RESIDENT_CTAS programs per SM (batch 1 needs many,
    batch 8 a few), each over at least MIN_SPLIT_TOKENS positions, at most 128."""
    want = _cdiv(MIN_RESIDENT_CTAS * sms, batch_heads)
    return max(1, min(want, n_tiles * block_t // MIN_SPLIT_TOKENS, 128))


def default_splits(batch_heads: int, n_tiles: int, block_t: int, device: torch.device) -> int:
    """:func:`split_count` for ``device``'s SMs; off CUDA, two splits so the merge is exercised."""
    if device.type != "cuda":
        return max(1, min(n_tiles, 2))
    return split_count(batch_heads, n_tiles, block_t, _sm_count(device.index))


@functools.lru_cache(maxsize=16)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def row_lengths(k_words, v_words, k_res, k_bits: int, k_quantized=None, v_quantized=None,
                lengths=None, k_offset=None, v_offset=None) -> torch.Tensor:
    """(B, 5) int32 (length, packed keys, packed values, residual key / value offsets);
    defaults: every packed buffer full, residuals from index 0."""
    B, dev = k_words.shape[0], k_words.device
    full = lambda n: torch.full((B,), n, dtype=torch.int32, device=dev)  # noqa: E731
    tk = full(k_words.shape[2] * codes_per_word(k_bits)) if k_quantized is None else k_quantized
    tv = full(v_words.shape[2]) if v_quantized is None else v_quantized
    n = tk.to(dev) + k_res.shape[2] if lengths is None else lengths
    ko = full(0) if k_offset is None else k_offset
    vo = full(0) if v_offset is None else v_offset
    cols = [n, tk, tv, ko, vo]
    return torch.stack([c.to(dev, torch.int32) for c in cols], dim=1).contiguous()


def _strides2(t: torch.Tensor | None) -> tuple[int, int]:
    """Batch and head strides of an optional (B, Hq, ...) extra; (0, 0) when absent."""
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _check_extras(k_bias, scores_out, lse_out, B: int, Hq: int, tk_max: int, T: int) -> None:
    for name, t, dims in (("k_bias", k_bias, (B, Hq, tk_max)), ("scores_out", scores_out, (B, Hq, T)),
                          ("lse_out", lse_out, (B, Hq))):
        if t is None:
            continue
        if t.dtype != torch.float32 or t.dim() != len(dims) or t.stride(-1) != 1 or any(
                n < want if i == 2 else n != want for i, (n, want) in enumerate(zip(t.shape, dims))):
            raise ValueError(f"{name}: expected fp32 {dims} (last dim at least) with contiguous "
                             f"last dim, got {t.dtype} {tuple(t.shape)}")


def decode_attention(q, k_words, k_scale, k_zero, v_words, v_scale, v_zero, k_res, v_res, *,
                     k_bits: int, v_bits: int, group_size: int, sm_scale: float | None = None,
                     k_quantized: torch.Tensor | None = None, v_quantized: torch.Tensor | None = None,
                     lengths: torch.Tensor | None = None, k_offset: torch.Tensor | None = None,
                     v_offset: torch.Tensor | None = None, n_splits: int | None = None,
                     out: torch.Tensor | None = None, k_bias: torch.Tensor | None = None,
                     scores_out: torch.Tensor | None = None,
                     lse_out: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                     max_length: int | None = None, max_k_quantized: int | None = None) -> torch.Tensor:
    """Attention of one query per sequence over packed + residual K/V.

    q: (B, Hq, D) or (B, Hq, 1, D). Packed tensors as :mod:`kv_pack` returns them for ``Hkv =
    Hq / group`` heads, possibly with spare capacity along tokens. Per row ``b`` (all optional,
    (B,) ints): ``k_quantized[b]`` packed keys (a multiple of G; default: the whole buffer),
    ``v_quantized[b]`` packed values, ``lengths[b]`` positions in all (default: packed keys +
    ``k_res.shape[2]``); row b's remaining keys/values are ``k_res[b, :, ko:ko + lengths -
    k_quantized]`` and ``v_res[b, :, vo:vo + lengths - v_quantized]`` with ``ko = k_offset[b]``,
    ``vo = v_offset[b]`` (default 0: a right-aligned residual window has per-row offsets). Returns (B, Hq, D) in q's dtype (or ``out``).
    A cache that counts its rows passes them instead as ``rows``, the (B, 5) int32 table of
    :func:`row_lengths` already on the device, with ``max_length`` / ``max_k_quantized`` as host
    ints: the step then reads nothing back from the device.

    Optional, for methods that correct the packed keys and values (all fp32, channels contiguous):
    ``k_bias`` (B, Hq, >= max TK_Q) is added to the scaled scores ``sm_scale * q . k`` (natural
    units) of row b's packed positions ``t < k_quantized[b]`` before the softmax; ``scores_out``
    (B, Hq, >= max length) receives every position's final score and ``lse_out`` (B, Hq) the
    log-sum-exp over the row, both in the kernel's log2 units (``LOG2E * (sm_scale * q . k +
    k_bias)``), so ``exp2(scores_out[..., t] - lse_out)`` is position t's softmax probability.
    Positions at or past a row's length are left untouched in ``scores_out``.
    """
    check_layout(k_bits, group_size)
    check_layout(v_bits, group_size)
    # (B, Hq, 1, D) is read through its batch and head strides as it is: no slice per step
    B, Hq, D = (q.shape[0], q.shape[1], q.shape[-1])
    Hkv = k_res.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} are not a multiple of kv heads {Hkv}")
    if q.dtype not in _DOT or (q.dtype == torch.bfloat16 and INTERPRETING):
        raise ValueError(f"dtype {q.dtype}: supported fp16, bf16 (GPU only), fp32")
    if D % group_size:
        raise ValueError(f"head_dim={D} is not a multiple of group_size={group_size}")
    if q.stride(-1) != 1 or k_res.stride(-1) != 1 or v_res.stride(-1) != 1:
        raise ValueError("q and the residual tensors need contiguous channels")
    cap_k = k_words.shape[2] * codes_per_word(k_bits)
    cap_v = v_words.shape[2]
    if cap_k % group_size:
        raise ValueError(f"packed keys hold {cap_k} tokens, not a multiple of G={group_size}")
    k_words, k_scale, k_zero, v_words, v_scale, v_zero = (
        t.contiguous() for t in (k_words, k_scale, k_zero, v_words, v_scale, v_zero))
    if rows is None:
        rows = row_lengths(k_words, v_words, k_res, k_bits, k_quantized, v_quantized, lengths,
                           k_offset, v_offset)
    # host ints from the caller (a cache that counts its rows) avoid a device-to-host sync per step
    T = max_length if max_length is not None else int(rows[:, 0].max()) if B else 0
    tk_max = max_k_quantized if max_k_quantized is not None else int(rows[:, 1].max()) if B else 0
    _check_extras(k_bias, scores_out, lse_out, B, Hq, tk_max, T)
    group = Hq // Hkv
    block_h, block_t, use_dot = tile_shape(group, D, group_size)
    n_tiles = max(1, _cdiv(T, block_t))
    S = n_splits or default_splits(B * Hkv, n_tiles, block_t, q.device)
    S = max(1, min(S, n_tiles))
    tiles_per_split = _cdiv(n_tiles, S)
    S = _cdiv(n_tiles, tiles_per_split)
    # the splits' (max, sum, output), flat as the kernels index them (a view per step costs host
    # time, which a decode step has little of)
    pm = torch.empty(B * Hq * S, dtype=torch.float32, device=q.device)
    pl = torch.empty(B * Hq * S, dtype=torch.float32, device=q.device)
    pacc = torch.empty(B * Hq * S * D, dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    o3 = out[:, :, 0] if out.dim() == 4 else out
    scale = (1.0 / math.sqrt(D) if sm_scale is None else sm_scale) * LOG2E
    block_d = max(16, _pow2(D))
    # an absent extra gets a stand-in pointer and zero strides; its constexpr flag compiles it out
    kb = pm if k_bias is None else k_bias
    sc = pm if scores_out is None else scores_out
    lse = pm if lse_out is None else lse_out
    _decode_split_kernel[(B * Hkv, S)](
        q, k_words, k_scale, k_zero, v_words, v_scale, v_zero, k_res, v_res, rows,
        pm, pl, pacc, kb, sc,
        Hkv, D, cap_k, cap_v, scale, LOG2E, tiles_per_split,
        q.stride(0), q.stride(1), k_res.stride(0), k_res.stride(1), k_res.stride(2),
        v_res.stride(0), v_res.stride(1), v_res.stride(2),
        *_strides2(k_bias), *_strides2(scores_out),
        K_BITS=k_bits, V_BITS=v_bits, G=group_size, GROUP=group,
        BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_NG=block_d // group_size,
        USE_DOT=use_dot, DOT_DTYPE=_DOT[q.dtype],
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32: no TF32
        HAS_BIAS=k_bias is not None, WRITE_SCORES=scores_out is not None, NUM_STAGES=NUM_STAGES,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    _merge_splits_kernel[(B * Hq,)](pm, pl, pacc, o3, lse, Hq, S, D, o3.stride(0), o3.stride(1),
                                    *_strides2(lse_out),
                                    BLOCK_S=max(2, _pow2(S)), BLOCK_D=block_d,
                                    WRITE_LSE=lse_out is not None)
    return out
