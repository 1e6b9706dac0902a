"""Tile-level pieces of :mod:`qeval.kernels.kv_decode_attention`: unpack KIVI words, dequantize a
key or value tile, contract it with the query heads, one online-softmax step.

Two ways to contract a tile, chosen by the ``USE_DOT`` constexpr:

- ``tl.dot`` with the tokens on the MMA's rows and the group's query heads on its columns,
  ``s^T = k @ q^T`` and ``o^T = v^T @ p^T``: an mma.sync tile is 16 rows by 8 columns, so a group
  of 8 fills it and a group of 2 uses a quarter (Triton pads columns below 8 in registers). Put
  the other way round (heads as rows) the MMA needs 16 rows, and a group of 4 would waste 3/4;
- for one query head (MHA), a broadcast multiply and reduce in fp32, on exactly one row: a
  ``(1, BLOCK_D, BLOCK_T)`` product summed over channels for ``q . k`` and a
  ``(1, BLOCK_T, BLOCK_D)`` product summed over tokens for ``p @ v``. Its registers grow with the
  group (every thread keeps its channels of each query row and its tokens' probabilities of each
  row): on sm_80 at head_dim 128 one head takes 128 registers, 2 heads 204, 4 heads 255 with
  spills, so larger groups take the MMA.

Decode attention is bound by the bytes it reads; both ways do a few FMAs per byte.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qeval.kernels._env import INTERPRETING  # noqa: F401  (interpreter choice before @triton.jit)

# the smallest GQA group that runs on tensor cores (see the module docstring)
DOT_MIN_GROUP = 2


@triton.jit
def unpack_rows(words, BITS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """(ROWS // FPI, COLS) words -> (ROWS, COLS) float codes: word w holds rows w*FPI ..."""
    FPI: tl.constexpr = 32 // BITS
    shifts = (tl.arange(0, FPI) * BITS).to(tl.uint32)
    w = words.to(tl.uint32, bitcast=True)
    codes = (w[:, None, :] >> shifts[None, :, None]) & (2**BITS - 1)
    return tl.reshape(codes, (ROWS, COLS)).to(tl.float32)


@triton.jit
def unpack_cols(words, BITS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """(ROWS, COLS // FPI) words -> (ROWS, COLS) float codes: word w holds columns w*FPI ..."""
    FPI: tl.constexpr = 32 // BITS
    shifts = (tl.arange(0, FPI) * BITS).to(tl.uint32)
    w = words.to(tl.uint32, bitcast=True)
    codes = (w[:, :, None] >> shifts[None, None, :]) & (2**BITS - 1)
    return tl.reshape(codes, (ROWS, COLS)).to(tl.float32)


@triton.jit
def scores(q, k, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr):
    """q (BLOCK_H, BLOCK_D) (DOT_DTYPE with USE_DOT, else fp32), k (BLOCK_T, BLOCK_D) fp32
    -> q @ k^T (BLOCK_H, BLOCK_T) fp32."""
    if USE_DOT:   # tokens on the MMA's rows, heads on its columns
        return tl.trans(tl.dot(k.to(DOT_DTYPE), tl.trans(q), input_precision=DOT_PRECISION))
    else:
        # (BLOCK_H, BLOCK_D, BLOCK_T), tokens last: Triton's default layout puts the lanes on the
        # last axis, so the sum over channels stays mostly within a thread (channels last would
        # make every score a shuffle reduction across all 128 threads)
        return tl.sum(q[:, :, None] * tl.trans(k)[None, :, :], axis=1)


@triton.jit
def weighted_values(p, v, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    USE_DOT: tl.constexpr):
    """p (BLOCK_H, BLOCK_T) fp32, v (BLOCK_T, BLOCK_D) fp32 -> p @ v (BLOCK_H, BLOCK_D) fp32."""
    if USE_DOT:   # channels on the MMA's rows, heads on its columns
        return tl.trans(tl.dot(tl.trans(v.to(DOT_DTYPE)), tl.trans(p.to(DOT_DTYPE)),
                               input_precision=DOT_PRECISION))
    else:
        # (BLOCK_H, BLOCK_T, BLOCK_D), channels on the lanes: the sum over tokens is in-thread
        return tl.sum(p[:, :, None] * v[None, :, :], axis=1)


@triton.jit
def packed_keys(kw_tile, ks_row, kz_row, n_read, D, d, K_BITS: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Dequantized (BLOCK_T, BLOCK_D) fp32 keys of a tile in one key group (BLOCK_T divides G).

    kw_tile: the tile's first word row of (BLOCK_T // FPI, D) int32 words, rows D apart; ks_row /
    kz_row: the group's (D,) scale / zero; channels ``d < n_read`` are read (D, or 0 for a tile
    of residual keys). Dequantizing the tile costs one FMA per code; folding the scale into the
    query instead keeps a second, scaled copy of the query live (an MMA operand every warp holds
    whole), which measured above the 168 registers of 3 CTAs per SM."""
    FPI: tl.constexpr = 32 // K_BITS
    wr = tl.arange(0, BLOCK_T // FPI)
    dmask = d < n_read
    words = tl.load(kw_tile + wr[:, None] * D + d[None, :], mask=dmask[None, :], other=0)
    ks = tl.load(ks_row + d, mask=dmask, other=0.0).to(tl.float32)
    kz = tl.load(kz_row + d, mask=dmask, other=0.0).to(tl.float32)
    return unpack_rows(words, K_BITS, BLOCK_T, BLOCK_D) * ks[None, :] + kz[None, :]


@triton.jit
def packed_values(vw_rows, vs_rows, vz_rows, t, tmask, n_wv, n_gv, V_BITS: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_NG: tl.constexpr, G: tl.constexpr):
    """Dequantized (BLOCK_T, BLOCK_NG * G) fp32 values of tokens ``t`` (zero where ``tmask`` is off).

    vw_rows: (tokens, n_wv) int32 words; vs_rows / vz_rows: (tokens, n_gv) per-token scale / zero
    of each channel group. The scales load as one (BLOCK_T, BLOCK_NG) tile and broadcast over
    the G channels of their group in registers, instead of one gathered load per element."""
    FPI: tl.constexpr = 32 // V_BITS
    VW: tl.constexpr = BLOCK_NG * G // FPI
    w = tl.arange(0, VW)
    gi = tl.arange(0, BLOCK_NG)
    words = tl.load(vw_rows + t[:, None] * n_wv + w[None, :],
                    mask=tmask[:, None] & (w < n_wv)[None, :], other=0)
    sp = t[:, None] * n_gv + gi[None, :]
    smask = tmask[:, None] & (gi < n_gv)[None, :]
    vs = tl.load(vs_rows + sp, mask=smask, other=0.0).to(tl.float32)
    vz = tl.load(vz_rows + sp, mask=smask, other=0.0).to(tl.float32)
    # (BLOCK_T, D) -> (BLOCK_T, BLOCK_NG, G): channel d = group * G + c, G a multiple of FPI
    codes = tl.reshape(unpack_cols(words, V_BITS, BLOCK_T, BLOCK_NG * G), (BLOCK_T, BLOCK_NG, G))
    v = codes * vs[:, :, None] + vz[:, :, None]
    return tl.reshape(v, (BLOCK_T, BLOCK_NG * G))


@triton.jit
def softmax_step(s, m_i, l_i, acc):
    """Online softmax over one tile of log2-unit scores s (BLOCK_H, BLOCK_T): the tile's
    probabilities, the new running max and sum, and the accumulator rescaled to the new max."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a fully masked tile: no NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, m_new, l_i, acc * alpha[:, None]


@triton.jit
def bias_and_record(s, t, TK_Q, kb_rows, sc_rows, hmask, valid, bias_scale,
                    HAS_BIAS: tl.constexpr, WRITE_SCORES: tl.constexpr):
    """GEAR's extras on log2-unit scores s (BLOCK_H, BLOCK_T): add the packed keys' bias
    (natural units, ``bias_scale`` = LOG2E), store the final scores. kb_rows / sc_rows:
    (BLOCK_H, 1) pointers to each query head's row; compiled out when both flags are off."""
    if HAS_BIAS:
        bias = tl.load(kb_rows + t[None, :], mask=hmask[:, None] & (t < TK_Q)[None, :], other=0.0)
        s += bias * bias_scale
    if WRITE_SCORES:
        tl.store(sc_rows + t[None, :], s, mask=hmask[:, None] & valid[None, :])
    return s
