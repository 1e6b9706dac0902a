"""Quantize-and-pack K/V into int32 words in KIVI's layout, the matching unpack, torch references.

KIVI (arXiv:2402.02750) quantizes keys per channel in groups of G tokens and values per token in
groups of G channels, asymmetric min-max with ``2**bits - 1`` levels, and packs ``32 // bits``
codes into one int32 word along the grouped axis:

| tensor | input (B, H, T, D) | words                          | scale / zero          |
| ------ | ------------------ | ------------------------------ | --------------------- |
| keys   | T % G == 0         | (B, H, T // (32 // bits), D)   | (B, H, T // G, D)     |
| values | D % G == 0         | (B, H, T, D // (32 // bits))   | (B, H, T, D // G)     |

Code ``i`` of a word sits in bits ``[i * bits, (i + 1) * bits)``: word ``w`` of a key column holds
tokens ``w * 32 // bits ...`` in order, so a decode tile of G tokens is ``G // (32 // bits)`` word
rows, contiguous over channels (coalesced loads). The numerics are those of
:func:`qeval.quant.quantize` (fp32 statistics, guarded scale, round half to even, excluded
elements kept out of min/max), so codes are bit-for-bit equal to the torch quantizer's; scale and
zero are then stored in ``param_dtype`` (the activation dtype by default, as KIVI does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qeval.kernels._env import INTERPRETING  # noqa: F401  (interpreter choice before @triton.jit)
from qeval.quant.primitives import quantize

PACK_BITS = (2, 4, 8)


def codes_per_word(bits: int) -> int:
    return 32 // bits


def check_layout(bits: int, group_size: int) -> None:
    """Raise ``ValueError`` for a (bits, group) pair the packed layout cannot hold."""
    if bits not in PACK_BITS:
        raise ValueError(f"bits={bits}: packed KV kernels support {PACK_BITS}")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size={group_size}: packed KV kernels need a power of two >= 16")


# -- kernels ---------------------------------------------------------------------------------------
@triton.jit
def _round_half_even(y):
    """torch.round semantics without libdevice (the interpreter has none): exact in fp32."""
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def _quantize_tile(x, valid, excluded, AXIS: tl.constexpr, QMAX: tl.constexpr):
    """fp32 tile -> (codes as uint32, scale, zero) with statistics along ``AXIS``."""
    keep = valid & (excluded == 0)
    lo = tl.min(tl.where(keep, x, float("inf")), axis=AXIS)
    hi = tl.max(tl.where(keep, x, float("-inf")), axis=AXIS)
    empty = lo == float("inf")          # every element excluded: zero range, as quant.quantize
    lo = tl.where(empty, 0.0, lo)
    hi = tl.where(empty, 0.0, hi)
    scale = tl.math.div_rn(hi - lo, QMAX)   # IEEE division: '/' may be approximate on a GPU
    scale = tl.where(scale == 0.0, 1.0, scale)
    y = tl.math.div_rn(x - tl.expand_dims(lo, AXIS), tl.expand_dims(scale, AXIS))
    codes = tl.minimum(tl.maximum(_round_half_even(y), 0.0), QMAX)
    return codes.to(tl.uint32), scale, lo


@triton.jit
def _pack_keys_kernel(
    x_ptr,        # (B*H, T, D) float, strides (sx_bh, sx_t, 1): keys
    ex_ptr,       # (B, T) uint8: 1 = excluded from statistics (left padding); unused if not HAS_EX
    words_ptr,    # (B*H, T // FPI, D) int32
    scale_ptr,    # (B*H, T // G, D) param dtype
    zero_ptr,     # (B*H, T // G, D) param dtype
    H, T, D, sx_bh, sx_t,
    BITS: tl.constexpr, G: tl.constexpr, BLOCK_D: tl.constexpr, HAS_EX: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)   # (B*H) * T * D passes 2**31 for long, wide caches
    grp = tl.program_id(1)
    pid_d = tl.program_id(2)
    FPI: tl.constexpr = 32 // BITS
    QMAX: tl.constexpr = 2**BITS - 1
    t = grp * G + tl.arange(0, G)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    valid = (t[:, None] < T) & dmask[None, :]
    x = tl.load(x_ptr + bh * sx_bh + t[:, None] * sx_t + d[None, :], mask=valid, other=0.0)
    if HAS_EX:
        ex = tl.load(ex_ptr + (bh // H) * T + t, mask=t < T, other=0)
    else:
        ex = tl.zeros([G], dtype=tl.uint8)
    codes, scale, lo = _quantize_tile(x.to(tl.float32), valid, ex[:, None], 0, QMAX)
    # (G, BLOCK_D) -> (G // FPI, FPI, BLOCK_D): FPI consecutive tokens share one word
    codes = tl.reshape(codes, (G // FPI, FPI, BLOCK_D))
    shifts = (tl.arange(0, FPI) * BITS).to(tl.uint32)
    # disjoint bit fields: the sum is the bitwise or, and never leaves uint32
    words = tl.sum(codes << shifts[None, :, None], axis=1).to(tl.int32, bitcast=True)
    w = grp * (G // FPI) + tl.arange(0, G // FPI)
    n_words = T // FPI
    tl.store(words_ptr + bh * n_words * D + w[:, None] * D + d[None, :], words, mask=dmask[None, :])
    p = bh * (T // G) * D + grp * D + d
    tl.store(scale_ptr + p, scale.to(scale_ptr.dtype.element_ty), mask=dmask)
    tl.store(zero_ptr + p, lo.to(zero_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _pack_values_kernel(
    x_ptr,        # (B*H, T, D) float, strides (sx_bh, sx_t, 1): values
    ex_ptr,       # (B, T) uint8: 1 = excluded (a whole token); unused if not HAS_EX
    words_ptr,    # (B*H, T, D // FPI) int32
    scale_ptr,    # (B*H, T, D // G) param dtype
    zero_ptr,     # (B*H, T, D // G) param dtype
    H, T, D, sx_bh, sx_t,
    BITS: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr, HAS_EX: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)   # (B*H) * T * D passes 2**31 for long, wide caches
    pid_t = tl.program_id(1)
    grp = tl.program_id(2)          # channel group
    FPI: tl.constexpr = 32 // BITS
    QMAX: tl.constexpr = 2**BITS - 1
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = grp * G + tl.arange(0, G)
    tmask = t < T
    valid = tmask[:, None] & (d[None, :] < D)
    x = tl.load(x_ptr + bh * sx_bh + t[:, None] * sx_t + d[None, :], mask=valid, other=0.0)
    if HAS_EX:
        ex = tl.load(ex_ptr + (bh // H) * T + t, mask=tmask, other=0)
    else:
        ex = tl.zeros([BLOCK_T], dtype=tl.uint8)
    codes, scale, lo = _quantize_tile(x.to(tl.float32), valid, ex[:, None], 1, QMAX)
    # (BLOCK_T, G) -> (BLOCK_T, G // FPI, FPI): FPI consecutive channels share one word
    codes = tl.reshape(codes, (BLOCK_T, G // FPI, FPI))
    shifts = (tl.arange(0, FPI) * BITS).to(tl.uint32)
    words = tl.sum(codes << shifts[None, None, :], axis=2).to(tl.int32, bitcast=True)
    n_words = D // FPI
    w = grp * (G // FPI) + tl.arange(0, G // FPI)
    tl.store(words_ptr + bh * T * n_words + t[:, None] * n_words + w[None, :], words,
             mask=tmask[:, None])
    n_groups = D // G
    p = bh * T * n_groups + t * n_groups + grp
    tl.store(scale_ptr + p, scale.to(scale_ptr.dtype.element_ty), mask=tmask)
    tl.store(zero_ptr + p, lo.to(zero_ptr.dtype.element_ty), mask=tmask)


# -- launchers -------------------------------------------------------------------------------------
def _prepare(x: torch.Tensor, exclude: torch.Tensor | None):
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"expected (B, H, T, D) with contiguous channels, got {tuple(x.shape)}")
    B, H, T, D = x.shape
    # (B, H, T, D) -> (B*H, T, D) without a copy when B and H are mergeable
    x3 = x.reshape(B * H, T, D)
    ex = None
    if exclude is not None:
        # (B, 1, T, 1) or (B, T) bool -> (B, T) uint8
        ex = exclude.reshape(exclude.shape[0], -1).expand(B, T).to(torch.uint8).contiguous()
    return x3, ex


def pack_keys(x: torch.Tensor, bits: int, group_size: int, exclude: torch.Tensor | None = None,
              param_dtype: torch.dtype | None = None, out=None):
    """(B, H, T, D) keys -> (words, scale, zero), per channel in groups of ``group_size`` tokens.

    ``out``: optional preallocated (words, scale, zero) to write into (tests poison them)."""
    check_layout(bits, group_size)
    B, H, T, D = x.shape
    if T % group_size:
        raise ValueError(f"keys: T={T} is not a multiple of group_size={group_size}")
    x3, ex = _prepare(x, exclude)
    fpi, pdt = codes_per_word(bits), param_dtype or x.dtype
    words, scale, zero = out or (
        torch.empty(B, H, T // fpi, D, dtype=torch.int32, device=x.device),
        torch.empty(B, H, T // group_size, D, dtype=pdt, device=x.device),
        torch.empty(B, H, T // group_size, D, dtype=pdt, device=x.device))
    if T:
        block_d = min(64, triton.next_power_of_2(D))
        grid = (B * H, T // group_size, triton.cdiv(D, block_d))
        _pack_keys_kernel[grid](x3, ex if ex is not None else words, words, scale, zero,
                                H, T, D, x3.stride(0), x3.stride(1),
                                BITS=bits, G=group_size, BLOCK_D=block_d, HAS_EX=ex is not None)
    return words, scale, zero


def pack_values(x: torch.Tensor, bits: int, group_size: int, exclude: torch.Tensor | None = None,
                param_dtype: torch.dtype | None = None, out=None):
    """(B, H, T, D) values -> (words, scale, zero), per token in groups of ``group_size`` channels."""
    check_layout(bits, group_size)
    B, H, T, D = x.shape
    if D % group_size:
        raise ValueError(f"values: head_dim={D} is not a multiple of group_size={group_size}")
    x3, ex = _prepare(x, exclude)
    fpi, pdt = codes_per_word(bits), param_dtype or x.dtype
    words, scale, zero = out or (
        torch.empty(B, H, T, D // fpi, dtype=torch.int32, device=x.device),
        torch.empty(B, H, T, D // group_size, dtype=pdt, device=x.device),
        torch.empty(B, H, T, D // group_size, dtype=pdt, device=x.device))
    if T:
        block_t = 16
        grid = (B * H, triton.cdiv(T, block_t), D // group_size)
        _pack_values_kernel[grid](x3, ex if ex is not None else words, words, scale, zero,
                                  H, T, D, x3.stride(0), x3.stride(1),
                                  BITS=bits, G=group_size, BLOCK_T=block_t, HAS_EX=ex is not None)
    return words, scale, zero


# -- unpack and torch references -------------------------------------------------------------------
def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def unpack_codes(words: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """int32 words -> uint8 codes, each word expanded into ``32 // bits`` codes along ``axis``."""
    words = words.movedim(axis, -1)
    # (..., n) -> (..., n, FPI) -> (..., n * FPI); '& mask' undoes the sign of arithmetic shifts
    codes = (words[..., None] >> _shifts(bits, words.device)) & (2**bits - 1)
    return codes.reshape(*words.shape[:-1], words.shape[-1] * codes_per_word(bits)).movedim(-1, axis).to(
        torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Integer codes in [0, 2**bits) -> int32 words along ``axis`` (torch reference of packing)."""
    c = codes.movedim(axis, -1).to(torch.int64)
    fpi = codes_per_word(bits)
    # (..., n) -> (..., n // FPI, FPI); int64 so that code << 30 cannot overflow before the wrap
    c = c.reshape(*c.shape[:-1], -1, fpi) << _shifts(bits, c.device).to(torch.int64)
    words = c.sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, axis)


def dequantize_keys(words, scale, zero, bits: int, group_size: int, dtype=None) -> torch.Tensor:
    """(B, H, T // FPI, D) words -> (B, H, T, D) keys, in ``dtype`` (default: the scale's)."""
    codes = unpack_codes(words, bits, axis=-2).float()
    B, H, T, D = codes.shape
    # (B, H, T, D) -> (B, H, T // G, G, D)
    x = codes.reshape(B, H, T // group_size, group_size, D) * scale.float()[..., None, :] \
        + zero.float()[..., None, :]
    return x.reshape(B, H, T, D).to(dtype or scale.dtype)


def dequantize_values(words, scale, zero, bits: int, group_size: int, dtype=None) -> torch.Tensor:
    """(B, H, T, D // FPI) words -> (B, H, T, D) values."""
    codes = unpack_codes(words, bits, axis=-1).float()
    B, H, T, D = codes.shape
    # (B, H, T, D) -> (B, H, T, D // G, G)
    x = codes.reshape(B, H, T, D // group_size, group_size) * scale.float()[..., None] \
        + zero.float()[..., None]
    return x.reshape(B, H, T, D).to(dtype or scale.dtype)


def _exclude4(exclude, x):
    if exclude is None:
        return None
    return exclude.reshape(exclude.shape[0], 1, -1, 1).expand_as(x)


def pack_keys_torch(x, bits: int, group_size: int, exclude=None, param_dtype=None):
    """Reference: :func:`qeval.quant.quantize` along tokens, then :func:`pack_codes`."""
    check_layout(bits, group_size)
    B, H, T, D = x.shape
    q = quantize(x, bits, axis=-2, group_size=group_size, exclude=_exclude4(exclude, x))
    # codes (B, H, D, T // G, G) -> (B, H, T, D)
    codes = q.codes.reshape(B, H, D, T).transpose(-1, -2)
    pdt = param_dtype or x.dtype
    scale = q.scale.reshape(B, H, D, T // group_size).transpose(-1, -2).to(pdt)
    zero = q.zero.reshape(B, H, D, T // group_size).transpose(-1, -2).to(pdt)
    return pack_codes(codes, bits, axis=-2).contiguous(), scale.contiguous(), zero.contiguous()


def pack_values_torch(x, bits: int, group_size: int, exclude=None, param_dtype=None):
    """Reference: :func:`qeval.quant.quantize` along channels, then :func:`pack_codes`."""
    check_layout(bits, group_size)
    B, H, T, D = x.shape
    q = quantize(x, bits, axis=-1, group_size=group_size, exclude=_exclude4(exclude, x))
    codes = q.codes.reshape(B, H, T, D)
    pdt = param_dtype or x.dtype
    scale = q.scale.reshape(B, H, T, D // group_size).to(pdt)
    zero = q.zero.reshape(B, H, T, D // group_size).to(pdt)
    return pack_codes(codes, bits, axis=-1).contiguous(), scale, zero
