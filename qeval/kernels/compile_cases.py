"""The kernel specialisations the compile check builds: one row per launch worth proving.

Each case runs a launcher on uninitialised CPU tensors of a real model's shapes (Llama-2-7B /
Llama-3-8B heads and layers), so its constexprs and ``num_warps`` come from the launcher's own
tile choices, never from numbers copied here. Not the full product of options: each decode
width, group size, head dim, GQA group and dtype appears at least once, and the combinations
that make the largest tiles (G = 128, 2-bit codes, 8 query heads per KV head) are all present.

``occupancy`` marks the memory-bound kernels (decode attention, GEMV) that must leave room for
``MIN_RESIDENT_CTAS`` CTAs per SM in registers; every case must be spill-free and fit in shared
memory. Read with :func:`qeval.kernels.compile_check.recording` (kernels compiled, not interpreted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qeval.kernels import (
    act_quant,
    kv_decode_attention,
    kv_pack,
    w4a8_gemm,
    w8a8_gemm,
    wq_gemm,
)
from qeval.quant.packed import PackedWeight, codes_per_word

KERNELS = {
    "decode": kv_decode_attention._decode_split_kernel,
    "merge": kv_decode_attention._merge_splits_kernel,
    "pack_keys": kv_pack._pack_keys_kernel,
    "pack_values": kv_pack._pack_values_kernel,
    "wq": wq_gemm._wq_gemm_kernel,
    "wq_gemv": wq_gemm._wq_gemv_kernel,
    "w8a8": w8a8_gemm._w8a8_kernel,
    "w4a8": w4a8_gemm._w4a8_kernel,
    "act_quant": act_quant._act_quant_kernel,
}
TARGETS = (80, 90)
RESIDUAL = 128   # KIVI's R: the full-precision tail every decode step also reads
K_IN, N_OUT = 4096, 4096   # Llama-2-7B o_proj


@dataclass(frozen=True)
class Case:
    name: str
    kernel: str                  # key of KERNELS: which recorded launch the case compiles
    launch: Callable[[], object]
    occupancy: bool = False


def _decode(G, D, group, dtype, kb, vb, *, hkv=8, extras=False, splits=16):
    """KIVI decode attention: batch 1, ``hkv`` KV heads, 4 packed key groups + the residual."""
    def run():
        e = torch.empty
        cap = 4 * G if splits <= 4 else splits * G
        B, hq = 1, hkv * group
        packed = (e(B, hkv, cap // codes_per_word(kb), D, dtype=torch.int32),
                  e(B, hkv, cap // G, D, dtype=dtype), e(B, hkv, cap // G, D, dtype=dtype),
                  e(B, hkv, cap, D // codes_per_word(vb), dtype=torch.int32),
                  e(B, hkv, cap, D // G, dtype=dtype), e(B, hkv, cap, D // G, dtype=dtype))
        res = e(B, hkv, RESIDUAL, D, dtype=dtype)
        kw = {}
        if extras:   # GEAR's corrections: a score bias on packed keys, scores and lse out
            kw = {"k_bias": e(B, hq, cap), "scores_out": e(B, hq, cap + RESIDUAL), "lse_out": e(B, hq)}
        return kv_decode_attention.decode_attention(
            e(B, hq, D, dtype=dtype), *packed, res, res, k_bits=kb, v_bits=vb, group_size=G,
            n_splits=splits, **kw)
    return run


def _pack(keys: bool, bits, G, dtype, exclude=False, D=128, T=512):
    def run():
        x = torch.empty(1, 8, T, D, dtype=dtype)
        ex = torch.zeros(1, T, dtype=torch.bool) if exclude else None
        fn = kv_pack.pack_keys if keys else kv_pack.pack_values
        return fn(x, bits, G, exclude=ex)
    return run


def _packed_weight(bits, G, param_dtype) -> PackedWeight:
    e = torch.empty
    return PackedWeight(e(-(-K_IN // codes_per_word(bits)), N_OUT, dtype=torch.int32),
                        e(K_IN // G, N_OUT, dtype=param_dtype), e(K_IN // G, N_OUT, dtype=param_dtype),
                        bits, G, K_IN, N_OUT, 0)


def _wq(M, bits, G, dtype, split_k=None):
    pdt = torch.float32 if dtype == torch.float32 else torch.float16   # pack.param_dtype_for
    return lambda: wq_gemm.wq_matmul(torch.empty(M, K_IN, dtype=dtype), _packed_weight(bits, G or K_IN, pdt),
                                     split_k=split_k)


def _w8a8(M, dtype, bias=True):
    def run():
        f = lambda: torch.empty(N_OUT)
        w = w8a8_gemm.Int8Weight(torch.empty(K_IN, N_OUT, dtype=torch.int8), f(), f(), f(), K_IN, N_OUT)
        b = torch.empty(N_OUT, dtype=dtype) if bias else None
        return w8a8_gemm.w8a8_matmul(torch.empty(M, K_IN, dtype=dtype), w, b)
    return run


def _w4a8(M, bits, G, dtype):
    def run():
        p = _packed_weight(bits, G, torch.float16)
        w = w4a8_gemm.GroupedInt8Weight(p, torch.empty(K_IN // G, N_OUT), torch.empty(N_OUT))
        return w4a8_gemm.w4a8_matmul(torch.empty(M, K_IN, dtype=dtype), w)
    return run


def _act(M, K, dtype, symmetric):
    return lambda: act_quant.quantize_per_token(torch.empty(M, K, dtype=dtype), 8, symmetric)


f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
CASES = [
    # decode attention (G, D, GQA group, dtype, K bits, V bits)
    Case("decode-G32-D128-grp1-fp16-k2v2", "decode", _decode(32, 128, 1, f16, 2, 2), True),
    # the smallest group on tensor cores: 2 query heads as the MMA's columns (padded to 8)
    Case("decode-G32-D128-grp2-fp16-k4v4", "decode", _decode(32, 128, 2, f16, 4, 4), True),
    Case("decode-G32-D128-grp4-bf16-k4v4", "decode", _decode(32, 128, 4, bf16, 4, 4), True),
    Case("decode-G32-D64-grp8-fp16-k8v8", "decode", _decode(32, 64, 8, f16, 8, 8), True),
    Case("decode-G64-D128-grp8-bf16-k2v2", "decode", _decode(64, 128, 8, bf16, 2, 2), True),
    Case("decode-G64-D64-grp4-fp16-k4v2", "decode", _decode(64, 64, 4, f16, 4, 2), True),
    Case("decode-G128-D128-grp1-fp16-k4v4", "decode", _decode(128, 128, 1, f16, 4, 4), True),
    Case("decode-G128-D128-grp4-bf16-k2v2", "decode", _decode(128, 128, 4, bf16, 2, 2), True),
    Case("decode-G128-D128-grp8-fp16-k8v8", "decode", _decode(128, 128, 8, f16, 8, 8), True),
    Case("decode-G32-D64-grp4-fp32-k4v4", "decode", _decode(32, 64, 4, f32, 4, 4), True),
    Case("decode-gear-G32-D128-grp4-fp16-k4v2", "decode",
         _decode(32, 128, 4, f16, 4, 2, extras=True), True),
    # the split merge: S = 128 splits is batch 1 with one KV head (default_splits' cap)
    Case("merge-S128-D128-fp16", "merge", _decode(32, 128, 1, f16, 2, 2, hkv=1, splits=128), True),
    Case("merge-S8-D64-bf16-lse", "merge", _decode(32, 64, 4, bf16, 4, 4, extras=True, splits=8), True),
    # KIVI quantize-and-pack (prefill and block flushes)
    Case("pack-keys-G32-b2-fp16", "pack_keys", _pack(True, 2, 32, f16)),
    Case("pack-keys-G128-b4-bf16-exclude", "pack_keys", _pack(True, 4, 128, bf16, exclude=True)),
    Case("pack-values-G32-b2-fp16-exclude", "pack_values", _pack(False, 2, 32, f16, exclude=True)),
    Case("pack-values-G128-b8-bf16", "pack_values", _pack(False, 8, 128, bf16)),
    # weight-only GEMM: decode (GEMV, M <= 16) and prefill tiles
    Case("wq-decode-M1-w4g128-fp16", "wq_gemv", _wq(1, 4, 128, f16), True),
    Case("wq-decode-M16-w3g128-bf16", "wq", _wq(16, 3, 128, bf16), True),
    Case("wq-decode-M1-w8-perchannel-fp16", "wq_gemv", _wq(1, 8, None, f16), True),
    Case("wq-decode-M1-w4g128-fp32", "wq_gemv", _wq(1, 4, 128, f32), True),
    # groups not aligned to words, and the split-K atomic epilogue (a GPU's SM count picks split-K)
    Case("wq-decode-M1-w3g128-bf16-splitk", "wq_gemv", _wq(1, 3, 128, bf16, split_k=8), True),
    Case("wq-decode-M8-w4g64-fp16-splitk", "wq", _wq(8, 4, 64, f16, split_k=8), True),
    Case("wq-prefill-M512-w4g128-fp16", "wq", _wq(512, 4, 128, f16)),
    Case("wq-prefill-M512-w2g64-bf16", "wq", _wq(512, 2, 64, bf16)),
    Case("wq-prefill-M512-w4g128-fp32", "wq", _wq(512, 4, 128, f32)),
    # int8-activation GEMMs and the activation quantizer feeding them
    Case("w8a8-decode-M1-fp16-bias", "w8a8", _w8a8(1, f16), True),
    Case("w8a8-prefill-M512-bf16", "w8a8", _w8a8(512, bf16, bias=False)),
    Case("w4a8-decode-M1-w4g128-fp16", "w4a8", _w4a8(1, 4, 128, f16), True),
    Case("w4a8-decode-M1-w4g32-bf16", "w4a8", _w4a8(1, 4, 32, bf16), True),
    Case("w4a8-prefill-M512-w4g128-bf16", "w4a8", _w4a8(512, 4, 128, bf16)),
    Case("act-quant-M16-K4096-fp16-asym", "act_quant", _act(16, 4096, f16, False)),
    Case("act-quant-M512-K11008-bf16-sym", "act_quant", _act(512, 11008, bf16, True)),
]
