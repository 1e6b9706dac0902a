"""Torch references for :func:`qeval.kernels.kv_decode_attention.decode_attention`: the per-row
fp32 attention the kernel must equal, and dequantize-then-SDPA, the baseline it must beat."""

from __future__ import annotations

import math

import torch

from qeval.kernels.kv_decode_attention import row_lengths
from qeval.kernels.kv_pack import codes_per_word, dequantize_keys, dequantize_values


def dequantized_cache(k_words, k_scale, k_zero, v_words, v_scale, v_zero, k_res, v_res, *,
                      k_bits: int, v_bits: int, group_size: int, dtype: torch.dtype):
    """Full (B, Hkv, T, D) K and V in ``dtype`` for full buffers: dequantize, append the residual."""
    k = torch.cat([dequantize_keys(k_words, k_scale, k_zero, k_bits, group_size, dtype),
                   k_res.to(dtype)], dim=2)
    v = torch.cat([dequantize_values(v_words, v_scale, v_zero, v_bits, group_size, dtype),
                   v_res.to(dtype)], dim=2)
    return k, v


def decode_attention_torch(q, k_words, k_scale, k_zero, v_words, v_scale, v_zero, k_res, v_res,
                           *, k_bits: int, v_bits: int, group_size: int,
                           sm_scale: float | None = None, k_quantized=None, v_quantized=None,
                           lengths=None, k_offset=None, v_offset=None, use_sdpa: bool = False,
                           k_bias: torch.Tensor | None = None, with_scores: bool = False):
    """Reference: per row, dequantize its packed prefix, append its residual, fp32 softmax
    attention. With ``use_sdpa`` (full buffers only): dequantize-then-attend with
    ``scaled_dot_product_attention`` in the activation dtype, the baseline the kernel must beat.

    ``k_bias`` as :func:`decode_attention`'s. ``with_scores``: return ``(out, scores, lse)`` with
    the final scores (B, Hq, max length; -inf past a row's length) and their log-sum-exp (B, Hq)
    in natural units (the kernel's log2 units divided by LOG2E)."""
    q3 = q[:, :, 0] if q.dim() == 4 else q
    B, Hq, D = q3.shape
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    if use_sdpa:
        if k_bias is not None or with_scores:
            raise ValueError("use_sdpa takes neither k_bias nor with_scores")
        k, v = dequantized_cache(k_words, k_scale, k_zero, v_words, v_scale, v_zero, k_res, v_res,
                                 k_bits=k_bits, v_bits=v_bits, group_size=group_size,
                                 dtype=q3.dtype)
        o = torch.nn.functional.scaled_dot_product_attention(q3[:, :, None], k, v, scale=scale,
                                                             enable_gqa=True)
        return o[:, :, 0]
    rows = row_lengths(k_words, v_words, k_res, k_bits, k_quantized, v_quantized, lengths,
                       k_offset, v_offset).tolist()
    T = max((r[0] for r in rows), default=0)
    scores = torch.full((B, Hq, T), float("-inf"), device=q3.device)
    fpi_k, out = codes_per_word(k_bits), []
    for b, (n, tk, tv, ko, vo) in enumerate(rows):
        sl = slice(b, b + 1)
        k = torch.cat([dequantize_keys(k_words[sl, :, :tk // fpi_k], k_scale[sl, :, :tk // group_size],
                                       k_zero[sl, :, :tk // group_size], k_bits, group_size,
                                       torch.float32),
                       k_res[sl, :, ko:ko + n - tk].float()], dim=2)
        v = torch.cat([dequantize_values(v_words[sl, :, :tv], v_scale[sl, :, :tv],
                                         v_zero[sl, :, :tv], v_bits, group_size, torch.float32),
                       v_res[sl, :, vo:vo + n - tv].float()], dim=2)
        rep = Hq // k.shape[1]
        # (1, Hkv, n, D) -> (1, Hq, n, D)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        s = torch.einsum("bhd,bhtd->bht", q3[sl].float(), k) * scale
        if k_bias is not None:
            s[..., :tk] += k_bias[sl, :, :tk].float()
        scores[sl, :, :n] = s
        out.append(torch.einsum("bht,bhtd->bhd", torch.softmax(s, dim=-1), v))
    out = torch.cat(out).to(q3.dtype)
    if with_scores:
        return out, scores, torch.logsumexp(scores, dim=-1)
    return out
