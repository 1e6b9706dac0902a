"""The packed weight storage type (:class:`PackedWeight`) and its bit packing: b-bit codes along the
input dimension in int32 words, built by the quantization code and consumed by the weight kernels.

Layout (GPTQ-like, "K-major words"): a weight ``(N out, K in)`` is held as ``words (ceil(K / C), N)``
int32 with ``C = 32 // bits`` codes per word, code ``k`` of column ``n`` in bits
``[(k % C) * bits, (k % C + 1) * bits)`` of ``words[k // C, n]``. Reading a ``(BLOCK_K, BLOCK_N)``
tile is then one coalesced load along N per word row. 4 and 8 bits fill a word (8 and 4 codes);
3 bits holds 10 codes in 30 bits (3.2 bits per weight, 2 bits per word unused) so no code straddles
two words and every kernel decodes with one shift and one mask.

Scales and zeros are ``(K // G, N)``, one per group of ``G`` inputs and output column, in the
model's float dtype (float16 for 16-bit models, float32 otherwise). Codes are unsigned: a symmetric
method's signed code ``c`` is stored as ``c + 2**(bits-1)`` and ``offset`` says what to subtract,
so dequantization is always ``(code - offset) * scale + zero``, the arithmetic of
:func:`qeval.quant.dequantize`. ``zero`` is a real offset in every zero-point convention: an integer
zero point ``z`` (``integer``, ``gptq``) is held as ``-z * scale`` (:func:`qeval.quant.real_offset`),
so the kernels need no second form. Before the parameters are rounded to the storage dtype this
dequantizes to fake quantization's ``(code - z) * scale``: bit for bit when the scale has at most
11 significant bits (a float16 or bfloat16 model: ``code * scale``, ``z * scale`` and their
difference are then exact in float32), and within one float32 rounding of ``z * scale`` otherwise
(:func:`integer_zero_gap`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from qeval.quant.primitives import quantize, real_offset

PACKABLE_BITS = (2, 3, 4, 5, 6, 7, 8)


def codes_per_word(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits}: packable widths are {PACKABLE_BITS}")
    return 32 // bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) unsigned integer codes < 2**bits -> (ceil(K / C), N) int32 words."""
    c = codes_per_word(bits)
    n, k = codes.shape
    if codes.min() < 0 or codes.max() >= 2**bits:
        raise ValueError(f"codes outside [0, {2**bits - 1}] cannot be packed at {bits} bits")
    n_words = -(-k // c)
    padded = torch.zeros(n, n_words * c, dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes.to(torch.int64)
    # (N, K_pad) -> (N, n_words, C): code i of a word is shifted by i * bits
    shifts = torch.arange(c, device=codes.device, dtype=torch.int64) * bits
    words = (padded.reshape(n, n_words, c) << shifts).sum(-1)
    # an unsigned 32-bit pattern into int32 (two's complement wrap), then (n_words, N)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).t().contiguous()


def unpack_codes(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (ceil(K / C), N) int32 -> (N, K) int32 codes."""
    c = codes_per_word(bits)
    shifts = torch.arange(c, device=words.device, dtype=torch.int32) * bits
    # (n_words, N) -> (N, n_words, C) -> (N, n_words * C)
    codes = (words.t()[:, :, None] >> shifts) & (2**bits - 1)
    return codes.reshape(words.shape[1], -1)[:, :k].contiguous()


@dataclass
class PackedWeight:
    """A weight quantized once and held packed; see the module docstring for the layout."""

    words: torch.Tensor     # (ceil(K / C), N) int32
    scale: torch.Tensor     # (K // G, N) float
    zero: torch.Tensor      # (K // G, N) float
    bits: int
    group_size: int         # G; K for one group per output channel
    in_features: int        # K
    out_features: int       # N
    offset: int             # 0 (asymmetric) or 2**(bits-1) (symmetric codes stored unsigned)

    def with_param_dtype(self, dtype: torch.dtype) -> "PackedWeight":
        """The same codes with scales and zeros held in ``dtype``."""
        return replace(self, scale=self.scale.to(dtype), zero=self.zero.to(dtype))

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.scale.nbytes + self.zero.nbytes

    def codes(self) -> torch.Tensor:
        """(N, K) unsigned codes."""
        return unpack_codes(self.words, self.bits, self.in_features)


def param_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Scales and zeros: float16 beside 16-bit weights (bf16's 8-bit mantissa is too coarse for a
    scale), float32 otherwise so a float32 model reproduces fake quantization bit for bit."""
    return torch.float16 if dtype in (torch.float16, torch.bfloat16) else torch.float32


def pack_weight(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = False,
                per_tensor: bool = False, zero_point: str = "real") -> PackedWeight:
    """Quantize ``w (N, K)`` with :func:`qeval.quant.quantize` and pack it (float32 scales and zeros,
    so the result dequantizes exactly like fake quantization; see :meth:`PackedWeight.with_param_dtype`).

    ``group_size`` None means one group per output channel (G = K); ``per_tensor`` takes one
    min/max over the whole tensor and repeats it for every column, which the group layout holds.
    ``zero_point`` is the convention of :func:`qeval.quant.quantize`; see the module docstring for
    how an integer zero is held.
    """
    n, k = w.shape
    if per_tensor:
        q = quantize(w, bits, None, None, symmetric, zero_point=zero_point)
        codes = q.codes.reshape(n, k)
        scale = q.scale.reshape(1, 1).expand(1, n)
        zero = real_offset(q).reshape(1, 1).expand(1, n)
        g = k
    else:
        g = k if group_size is None else group_size
        q = quantize(w, bits, -1, g, symmetric, zero_point=zero_point)
        # codes (N, K // G, G) -> (N, K); scale, zero (N, K // G, 1) -> (K // G, N)
        codes = q.codes.reshape(n, k)
        scale = q.scale[..., 0].t()
        zero = real_offset(q)[..., 0].t()
    offset = 2 ** (bits - 1) if symmetric else 0
    return PackedWeight(pack_codes(codes.to(torch.int32) + offset, bits), scale.float().contiguous(),
                        zero.float().contiguous(), bits, g, k, n, offset)


def dequantize_packed(p: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Torch reference: (N, K) weight in ``dtype``, ``(code - offset) * scale + zero`` in float32."""
    # (K // G, N) -> (N, K): every group's parameters repeated over its G inputs
    scale = p.scale.float().t().repeat_interleave(p.group_size, dim=1)
    zero = p.zero.float().t().repeat_interleave(p.group_size, dim=1)
    return ((p.codes() - p.offset).float() * scale + zero).to(dtype)


def integer_zero_gap(p: PackedWeight) -> torch.Tensor:
    """(N, K) bound on ``|dequantize_packed(p) - fake quantization|`` for an integer zero held as
    ``-z * scale`` (float32 parameters): ``code * scale`` and ``z * scale`` round once each and their
    sum once more, each by at most half an ulp of a value no larger than ``qmax * scale``, and fake
    quantization rounds once, so four half-ulps at ``qmax * scale`` cover it."""
    qmax = 2**p.bits - 1
    scale = p.scale.float().abs().t().repeat_interleave(p.group_size, dim=1)
    return 2 * torch.finfo(torch.float32).eps * qmax * scale
