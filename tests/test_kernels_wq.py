"""Bit packing and the weight-only dequant-fused GEMM against their torch references.

Runs the kernels under TRITON_INTERPRET=1 on a CPU (set before triton is imported) and compiled on
a GPU when one exists. Odd shapes hit every mask; outputs are poisoned with NaN before each launch
so an element the kernel forgot to write shows up.
"""


import pytest
import torch

from qeval.quant.packed import PackedWeight, codes_per_word, dequantize_packed, pack_codes, pack_weight, unpack_codes
from qeval.kernels.wq_gemm import wq_matmul, wq_matmul_reference
from qeval.quant.primitives import fake_quantize, quantize, sqnr_db

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip_and_layout(bits):
    k = 37  # not a multiple of any codes-per-word: the last word is partly padding
    codes = torch.randint(0, 2**bits, (5, k), dtype=torch.int32)
    words = pack_codes(codes, bits)
    c = codes_per_word(bits)
    assert words.dtype == torch.int32 and words.shape == (-(-k // c), 5)
    assert torch.equal(unpack_codes(words, bits, k), codes)
    # the documented bit positions: code k of column n at bits (k % C) * bits of word k // C
    n, kk = 3, 21
    assert (int(words[kk // c, n]) >> ((kk % c) * bits)) & (2**bits - 1) == int(codes[n, kk])
    with pytest.raises(ValueError):
        pack_codes(codes + 2**bits, bits)


@pytest.mark.parametrize("bits,group,symmetric,per_tensor", [
    (4, 32, False, False), (3, 64, False, False), (8, None, False, False), (4, 32, True, False),
    (4, None, False, True)])
def test_packed_weight_dequantizes_like_fake_quantization(bits, group, symmetric, per_tensor):
    w = torch.randn(24, 128) * 0.05
    p = pack_weight(w, bits, group, symmetric, per_tensor)
    axis = None if per_tensor else -1
    assert torch.equal(dequantize_packed(p, torch.float32), fake_quantize(w, bits, axis, group, symmetric))
    q = quantize(w, bits, axis, None if per_tensor else (group or 128), symmetric)
    assert torch.equal(p.codes() - p.offset, q.codes.reshape(w.shape).int())
    # bytes held: the packed words plus one scale and zero per group and column
    n_groups = 1 if per_tensor or group is None else 128 // group
    assert p.nbytes == -(-128 // codes_per_word(bits)) * 24 * 4 + 2 * n_groups * 24 * 4
    half = p.with_param_dtype(torch.float16)
    assert half.scale.dtype == torch.float16 and half.nbytes < p.nbytes


SHAPES = [  # (M, K, N, G): decode batch 1 and 5, prefill 37 and 70; N never a multiple of 64
    (1, 256, 72, 128), (5, 192, 50, 64), (37, 96, 33, 32), (70, 128, 130, 128), (3, 100, 20, None)]


@pytest.mark.parametrize("bits", [4, 3, 8])
@pytest.mark.parametrize("m,k,n,g", SHAPES)
def test_wq_gemm_matches_reference(bits, m, k, n, g, poisoned_outputs):
    torch.manual_seed(m + k + n)
    w = torch.randn(n, k, device=DEVICE) * 0.05
    x = torch.randn(m, k + 7, device=DEVICE)[:, :k]     # a view: row stride K + 7, not K
    bias = torch.randn(n, device=DEVICE)
    p = pack_weight(w, bits, g)
    out = wq_matmul(x, p, bias)
    ref = wq_matmul_reference(x, p, bias)
    assert out.shape == (m, n) and torch.isfinite(out).all()
    # float32 end to end: only the summation order differs, so the error is a few ulps of |x| |w| K
    tol = 1e-5 * x.abs().max() * w.abs().max() * k + 1e-6
    err = (out - ref).abs()
    assert err.max() <= tol, f"max diff {err.max():.3g}, mean {err.mean():.3g}, tol {tol:.3g}"


@pytest.mark.parametrize("m", [2, 9])   # the GEMV kernel, the decode GEMM kernel
def test_wq_gemm_split_k_and_half_precision(m, poisoned_outputs):
    """Forced split-K adds the same partials atomically, the bias once; float16 weights and
    activations stay within fp16 noise."""
    torch.manual_seed(m)
    w, x = torch.randn(40, 512, device=DEVICE) * 0.05, torch.randn(m, 512, device=DEVICE)
    bias = torch.randn(40, device=DEVICE)
    p = pack_weight(w, 4, 128)
    ref = wq_matmul_reference(x, p, bias)
    # float32 throughout: summation order only, a few ulps of |x| |w| K = 512 (as above)
    tol = 1e-5 * x.abs().max() * w.abs().max() * 512 + 1e-6
    for split in (1, 3, 4):
        err = (wq_matmul(x, p, bias, split_k=split) - ref).abs().max()
        assert err <= tol, f"split {split}: max diff {err:.3g}, tol {tol:.3g}"
    if DEVICE == "cuda":  # the interpreter has float16 but no fast path worth testing on a CPU
        h = p.with_param_dtype(torch.float16)
        out = wq_matmul(x.half(), h)
        # 50 dB: fp16 rounding of x and of the dequantized weight (about 2**-11 relative each)
        assert sqnr_db(wq_matmul_reference(x.half(), h), out) > 50


@pytest.mark.parametrize("bits,g", [(4, 128), (3, 128), (3, 32), (4, 64)])
def test_wq_gemm_kernel_reads_each_word_once(bits, g):
    """The unpacking is in registers: a weight whose every code is distinct per position shows a
    wrong shift, a wrong group (each group scaled differently) or a word read for the wrong k."""
    k, n = 384, 24   # 38.4 words of 3-bit codes: the last word is partly padding
    codes = torch.arange(n * k).reshape(n, k) % (2**bits)
    p = PackedWeight(pack_codes(codes, bits), torch.arange(1, k // g + 1).float()[:, None].repeat(1, n),
                     torch.zeros(k // g, n), bits, g, k, n, 0)
    for m in (1, 7):
        x = torch.eye(k)[torch.randint(0, k, (m,))]   # one-hot rows pick single codes out
        assert torch.equal(wq_matmul(x, p), wq_matmul_reference(x, p))


def test_wq_gemm_rejects_a_mismatched_input():
    p = pack_weight(torch.randn(8, 64), 4, 32)
    assert isinstance(p, PackedWeight)
    with pytest.raises(ValueError, match="input features"):
        wq_matmul(torch.randn(2, 32), p)


def test_deterministic_mode_takes_one_split(monkeypatch):
    # float atomics add in no fixed order on a GPU: torch.use_deterministic_algorithms(True) must
    # make the GEMV take one split (no atomics); otherwise a short-N decode splits K
    from qeval.kernels import wq_gemm
    from qeval.quant.packed import pack_weight
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *a, **kw: None

    monkeypatch.setattr(wq_gemm, "_wq_gemv_kernel", Recorder())
    p = pack_weight(torch.randn(64, 2048), 4, 128)
    x = torch.randn(1, 2048)
    wq_gemm.wq_matmul(x, p)
    assert grids[-1][2] > 1
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    wq_gemm.wq_matmul(x, p)
    assert grids[-1][2] == 1
