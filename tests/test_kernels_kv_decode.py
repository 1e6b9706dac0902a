"""Fused decode attention over packed + residual K/V against the torch reference: ragged rows,
GQA groups, split-KV, K and V at different widths. CPU: Triton's interpreter; GPU: compiled.

Tolerance: fp32 runs agree to 1e-4 (the reference dequantizes the same codes; only summation
order differs); fp16 / bf16 to 2e-2 absolute on unit-scale outputs (the kernel feeds the dot in
the activation dtype, the reference computes in fp32).
"""


import pytest
import torch

from qeval.kernels import kv_decode_attention as kda
from qeval.kernels import kv_decode_reference as ref_impl
from qeval.kernels import kv_pack

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def make_cache(B, Hkv, D, G, kb, vb, cap, res_cap, dtype, seed=0):
    """Full packed buffers of ``cap`` tokens and residual buffers of ``res_cap`` tokens."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, cap, D, generator=g).to(DEV, dtype)
    v = torch.randn(B, Hkv, cap, D, generator=g).to(DEV, dtype)
    packed = kv_pack.pack_keys(k, kb, G) + kv_pack.pack_values(v, vb, G)
    kr = torch.randn(B, Hkv, res_cap, D, generator=g).to(DEV, dtype)
    vr = torch.randn(B, Hkv, res_cap, D, generator=g).to(DEV, dtype)
    return packed, kr, vr


# (B, Hq, Hkv, D, G, k_bits, v_bits, splits, dtype)
CASES = [
    (3, 6, 2, 48, 16, 2, 4, 3, torch.float32),     # GQA 3, head_dim 48 (masked), K2V4
    (2, 4, 4, 64, 32, 4, 2, 1, torch.float32),     # MHA, one split
    (1, 8, 1, 96, 32, 8, 8, 2, torch.float16),     # MQA 8, 8 bits
    (2, 10, 2, 32, 16, 2, 2, 4, torch.float16),    # GQA 5, many splits
    (2, 4, 2, 64, 64, 2, 4, 3, torch.float32),     # G = 64: two 32-token tiles per key group
]
# MHA in fp16: the broadcast path in the activation dtype (CASES has it in fp32 only)
MHA_FP16 = (2, 3, 3, 64, 32, 8, 4, 2, torch.float16)
if DEV == "cuda":
    CASES += [(4, 32, 8, 128, 32, 2, 2, None, torch.bfloat16),
              (2, 32, 32, 128, 128, 4, 4, None, torch.float16)]


def ragged(B, Hq, Hkv, D, G, kb, vb, dtype):
    """A packed cache with ragged rows, a query and the per-row keyword arguments."""
    cap, res_cap = 4 * G, 2 * G + 7
    packed, kr, vr = make_cache(B, Hkv, D, G, kb, vb, cap, res_cap, dtype, seed=B * D)
    # ragged rows: packed keys in whole groups, values anywhere, a tile that straddles TV_Q
    tk = torch.tensor([cap, G, 2 * G, 0][:B], dtype=torch.int32)
    n = tk + torch.tensor([5, G + 3, 0, 2 * G + 7][:B], dtype=torch.int32)
    tv = torch.clamp(n - torch.tensor([G + 2, 3, 2 * G + 7, 1][:B]), min=0).to(torch.int32)
    # right-aligned residual windows: each row's residual ends at the buffer's end
    ko, vo = res_cap - (n - tk), res_cap - (n - tv)
    assert (ko >= 0).all() and (vo >= 0).all()
    q = torch.randn(B, Hq, D, device=DEV).to(dtype)
    kw = dict(k_bits=kb, v_bits=vb, group_size=G, k_quantized=tk, v_quantized=tv, lengths=n,
              k_offset=ko, v_offset=vo)
    return q, packed, kr, vr, kw


def test_cases_cover_both_contractions():
    """Tensor cores for GQA groups, on exactly the group's heads (no 16-row padding); the
    broadcast path for MHA. CASES runs both through the interpreter."""
    paths = {kda.tile_shape(Hq // Hkv, D, G)[2] for _, Hq, Hkv, D, G, *_ in CASES}
    assert paths == {True, False}
    assert kda.tile_shape(1, 128, 32)[::2] == (1, False)
    for group in (2, 3, 4, 8, 16):
        block_h, block_t, use_dot = kda.tile_shape(group, 128, 128)
        assert use_dot and group <= block_h < 2 * group
    for G in (16, 32, 64, 128):
        for D in (G, 2 * G, 256):
            block_t = kda.tile_shape(4, D, G)[1]
            assert G % block_t == 0 and block_t >= 16   # one key group, one word row of 2-bit keys


def test_split_count_fills_the_gpu_at_batch_1_and_8():
    """132 SMs (H100 SXM), 8 KV heads: a long context gives every SM MIN_RESIDENT_CTAS programs at
    batch 1 and 8, a 4K context at least one per SM at batch 1; no split is shorter than
    MIN_SPLIT_TOKENS, and a short context is not split at all."""
    sms, block_t = 132, 16
    for batch in (1, 8):
        for tokens, per_sm in ((32768, kda.MIN_RESIDENT_CTAS), (4096, 1)):
            S = kda.split_count(batch * 8, tokens // block_t, block_t, sms)
            assert batch * 8 * S >= per_sm * sms, (batch, tokens, S)
            assert tokens // S >= kda.MIN_SPLIT_TOKENS
    assert kda.split_count(8, 100 // block_t, block_t, sms) == 1


@pytest.mark.parametrize("B,Hq,Hkv,D,G,kb,vb,splits,dtype", CASES + [MHA_FP16])
def test_decode_matches_reference_on_ragged_rows(B, Hq, Hkv, D, G, kb, vb, splits, dtype):
    q, packed, kr, vr, kw = ragged(B, Hq, Hkv, D, G, kb, vb, dtype)
    out = torch.full((B, Hq, D), float("nan"), device=DEV, dtype=dtype)
    kda.decode_attention(q, *packed, kr, vr, **kw, n_splits=splits, out=out)
    ref = ref_impl.decode_attention_torch(q, *packed, kr, vr, **kw)
    err = (out.float() - ref.float()).abs()
    assert not out.isnan().any(), "unwritten output elements"
    assert err.max() < TOL[dtype], f"max {err.max():.2e} mean {err.mean():.2e}"


def test_split_count_does_not_change_the_result():
    packed, kr, vr = make_cache(2, 2, 32, 16, 4, 4, 96, 9, torch.float32)
    q = torch.randn(2, 4, 32, device=DEV)
    kw = dict(k_bits=4, v_bits=4, group_size=16)
    outs = [kda.decode_attention(q, *packed, kr, vr, **kw, n_splits=s) for s in (1, 2, 7)]
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[0], outs[2], atol=1e-5)


def test_sdpa_baseline_agrees_and_bad_input_is_refused():
    packed, kr, vr = make_cache(1, 2, 32, 16, 2, 2, 32, 3, torch.float32)
    q = torch.randn(1, 4, 1, 32, device=DEV)   # (B, Hq, 1, D), as the model hands it over
    kw = dict(k_bits=2, v_bits=2, group_size=16)
    fused = kda.decode_attention(q, *packed, kr, vr, **kw)
    sdpa = ref_impl.decode_attention_torch(q, *packed, kr, vr, **kw, use_sdpa=True)
    assert torch.allclose(fused, sdpa, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        kda.decode_attention(q[:, :3], *packed, kr, vr, **kw)
    with pytest.raises(ValueError, match="bits=3"):
        kda.decode_attention(q, *packed, kr, vr, k_bits=3, v_bits=2, group_size=16)


@pytest.mark.parametrize("B,Hq,Hkv,D,G,kb,vb,splits,dtype", CASES)
def test_score_bias_scores_and_lse_match_reference(poisoned_outputs, B, Hq, Hkv, D, G, kb, vb, splits,
                                                   dtype):
    """``k_bias`` shifts the packed keys' scores (columns past a row's packed prefix, NaN here, are
    never read); ``scores_out`` / ``lse_out`` (poisoned first) are the reference's, in log2 units."""
    q, packed, kr, vr, kw = ragged(B, Hq, Hkv, D, G, kb, vb, dtype)
    n = kw["lengths"]
    bias = torch.randn(B, Hq, int(kw["k_quantized"].max()) + 1, device=DEV)
    for b, tk in enumerate(kw["k_quantized"].tolist()):
        bias[b, :, tk:] = float("nan")
    scores = torch.empty(B, Hq, int(n.max()), device=DEV)
    lse = torch.empty(B, Hq, device=DEV)
    out = kda.decode_attention(q, *packed, kr, vr, **kw, n_splits=splits, k_bias=bias,
                               scores_out=scores, lse_out=lse)
    ref, ref_scores, ref_lse = ref_impl.decode_attention_torch(q, *packed, kr, vr, **kw,
                                                          k_bias=bias, with_scores=True)
    assert not out.isnan().any() and (out.float() - ref.float()).abs().max() < TOL[dtype]
    # fp16 scores: the dot runs in fp16 on unit-scale inputs, scores are sums over D channels
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for b in range(B):
        got = scores[b, :, :int(n[b])] / kda.LOG2E
        assert not got.isnan().any(), "unwritten scores"
        assert (got - ref_scores[b, :, :int(n[b])]).abs().max() < tol
    assert (lse / kda.LOG2E - ref_lse).abs().max() < tol
    # the probabilities a caller forms from them are the reference's softmax
    p = torch.exp2(scores[0, :, :int(n[0])] - lse[0, :, None])
    assert torch.allclose(p.sum(-1), torch.ones(Hq, device=DEV), atol=1e-4)


@pytest.mark.parametrize("B,Hq,Hkv,D,G,kb,vb,splits,dtype", CASES)
def test_extras_leave_the_output_bit_identical(B, Hq, Hkv, D, G, kb, vb, splits, dtype):
    """A zero bias and the score / lse outputs change nothing in the attention output: the new
    arguments only add work beside the KIVI path, never inside it."""
    q, packed, kr, vr, kw = ragged(B, Hq, Hkv, D, G, kb, vb, dtype)
    plain = kda.decode_attention(q, *packed, kr, vr, **kw, n_splits=splits)
    extras = kda.decode_attention(
        q, *packed, kr, vr, **kw, n_splits=splits,
        k_bias=torch.zeros(B, Hq, int(kw["k_quantized"].max()), device=DEV),
        scores_out=torch.empty(B, Hq, int(kw["lengths"].max()), device=DEV),
        lse_out=torch.empty(B, Hq, device=DEV))
    assert torch.equal(plain, extras)


def test_bad_extras_are_refused():
    q, packed, kr, vr, kw = ragged(2, 4, 4, 64, 32, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="k_bias"):
        kda.decode_attention(q, *packed, kr, vr, **kw, k_bias=torch.zeros(2, 4, 3, device=DEV))
    with pytest.raises(ValueError, match="lse_out"):
        kda.decode_attention(q, *packed, kr, vr, **kw, lse_out=torch.zeros(2, 4, dtype=torch.float16))
