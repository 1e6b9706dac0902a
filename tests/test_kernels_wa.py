"""Per-token int8 activation quantization, W8A8 and W4A8 GEMMs against their torch references.

Integer codes must equal :func:`qeval.quant.quantize` exactly (ties included); GEMM outputs are
compared in float32, where only the summation order differs from the reference, and against the
fake-quantized matmul that ``backend=torch`` runs, which they must reproduce.
"""


import pytest
import torch

from qeval.kernels.act_quant import quantize_per_token, quantize_per_token_reference
from qeval.quant.packed import pack_weight
from qeval.kernels.w4a8_gemm import GroupedInt8Weight, w4a8_matmul, w4a8_matmul_reference
from qeval.kernels.w8a8_gemm import Int8Weight, w8a8_matmul, w8a8_matmul_reference
from qeval.quant.primitives import fake_quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



def _close(out, ref, x, w_abs_max, k):
    tol = 2e-5 * x.abs().max() * w_abs_max * k + 1e-6
    err = (out.float() - ref.float()).abs()
    assert torch.isfinite(out).all()
    assert err.max() <= tol, f"max diff {err.max():.3g}, mean {err.mean():.3g}, tol {tol:.3g}"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_act_quant_codes_equal_reference(bits, symmetric, poisoned_outputs):
    torch.manual_seed(bits)
    x = torch.randn(6, 1500, device=DEVICE) * 3           # K > one 1024 block: the loop and its mask
    x[1] = 0.75                                           # constant token: the guarded scale
    # exact ties: min 0, max = 2**bits - 1 steps of 1, values at k + 0.5 round half to even
    x[2, :] = 0.0
    x[2, 1] = 2**bits - 1
    x[2, 2:10] = torch.arange(8, device=DEVICE) + 0.5
    q, s, z = quantize_per_token(x, bits, symmetric)
    qr, sr, zr = quantize_per_token_reference(x, bits, symmetric)
    assert q.dtype == torch.int8 and torch.equal(q, qr)
    assert torch.equal(s, sr) and torch.allclose(z, zr, rtol=0, atol=1e-6)
    # and the codes still mean the same numbers as fake quantization
    assert torch.allclose(s[:, None] * q.float() + z[:, None], fake_quantize(x, bits, -1, None, symmetric),
                          atol=1e-5)


SHAPES = [(1, 96, 50, 32), (5, 192, 70, 64), (37, 100, 33, None), (20, 128, 130, 128)]


@pytest.mark.parametrize("m,k,n,_", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_w8a8_matches_reference_and_fake_quantization(m, k, n, _, symmetric, poisoned_outputs):
    torch.manual_seed(m * n)
    w, x, b = torch.randn(n, k, device=DEVICE) * 0.05, torch.randn(m, k, device=DEVICE), torch.randn(n, device=DEVICE)
    iw = Int8Weight.from_packed(pack_weight(w, 8, None, symmetric))
    assert iw.codes.dtype == torch.int8 and iw.codes.shape == (k, n)
    out = w8a8_matmul(x, iw, b, 8, symmetric)
    _close(out, w8a8_matmul_reference(x, iw, b, 8, symmetric), x, w.abs().max(), k)
    fq = torch.nn.functional.linear(fake_quantize(x, 8, -1, None, symmetric),
                                    fake_quantize(w, 8, -1, None, symmetric), b)
    _close(out, fq, x, w.abs().max(), k)


@pytest.mark.parametrize("m,k,n,g", SHAPES)
@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (3, 8), (8, 8), (4, 4)])
def test_w4a8_matches_reference_and_fake_quantization(m, k, n, g, w_bits, a_bits, poisoned_outputs):
    torch.manual_seed(m * n + w_bits)
    w, x, b = torch.randn(n, k, device=DEVICE) * 0.05, torch.randn(m, k, device=DEVICE), torch.randn(n, device=DEVICE)
    gw = GroupedInt8Weight.from_packed(pack_weight(w, w_bits, g))
    out = w4a8_matmul(x, gw, b, a_bits)
    _close(out, w4a8_matmul_reference(x, gw, b, a_bits), x, w.abs().max(), k)
    fq = torch.nn.functional.linear(fake_quantize(x, a_bits, -1, None), fake_quantize(w, w_bits, -1, g), b)
    _close(out, fq, x, w.abs().max(), k)
    # the folded zeros replace the packed ones: bytes held = words + scale + zero + row sums
    p = gw.packed
    assert gw.nbytes == p.words.nbytes + 2 * p.scale.nbytes + 4 * n


def test_w4a8_batched_input_keeps_leading_dims():
    w = torch.randn(16, 64, device=DEVICE)
    gw = GroupedInt8Weight.from_packed(pack_weight(w, 4, 32))
    x = torch.randn(2, 3, 64, device=DEVICE)
    out = w4a8_matmul(x, gw)
    assert out.shape == (2, 3, 16)
    assert torch.allclose(out, w4a8_matmul_reference(x, gw), atol=1e-4)
