"""Fused decode attention over packed + residual K/V against the torch reference: ragged rows,
GQA groups, split-KV, K and V at different widths. CPU: Triton's interpreter; GPU: compiled.

Tolerance: fp32 runs agree to 1e-4 (the reference dequantizes the same codes; only summation
order differs); fp16 / bf16 to 2e-2 absolute on unit-scale outputs (the kernel feeds the dot in
the activation dtype, the reference computes in fp32).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import pytest  # noqa: E402

from qeval.kernels import kv_decode_attention as kda  # noqa: E402
from qeval.kernels import kv_pack  # noqa: E402

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
]
if DEV == "cuda":
    CASES += [(4, 32, 8, 128, 32, 2, 2, None, torch.bfloat16),
              (2, 32, 32, 128, 128, 4, 4, None, torch.float16)]


@pytest.mark.parametrize("B,Hq,Hkv,D,G,kb,vb,splits,dtype", CASES)
def test_decode_matches_reference_on_ragged_rows(B, Hq, Hkv, D, G, kb, vb, splits, dtype):
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
    out = torch.full((B, Hq, D), float("nan"), device=DEV, dtype=dtype)
    kda.decode_attention(q, *packed, kr, vr, **kw, n_splits=splits, out=out)
    ref = kda.decode_attention_torch(q, *packed, kr, vr, **kw)
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
    sdpa = kda.decode_attention_torch(q, *packed, kr, vr, **kw, use_sdpa=True)
    assert torch.allclose(fused, sdpa, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        kda.decode_attention(q[:, :3], *packed, kr, vr, **kw)
    with pytest.raises(ValueError, match="bits=3"):
        kda.decode_attention(q, *packed, kr, vr, k_bits=3, v_bits=2, group_size=16)
