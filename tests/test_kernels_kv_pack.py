"""Quantize-and-pack in KIVI's layout: codes bit-for-bit equal to qeval.quant's, scale/zero equal,
unpack the exact inverse of pack. CPU: Triton's interpreter; GPU: the same tests compiled."""


import pytest
import torch

from qeval.kernels import kv_pack
from qeval.quant.primitives import quantize

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
# (bits, dtype, (B, H, T, D), G): odd batch / heads, several groups, head_dims that are not powers
# of two (masked channels)
KEY_CASES = [(b, dt, (3, 5, 64, 48), 32) for b in (2, 4, 8) for dt in DTYPES] + [
    (2, torch.float32, (1, 2, 32, 96), 16)]
VALUE_CASES = [(b, dt, 37) for b in (2, 4, 8) for dt in DTYPES] + [(4, torch.float32, 1)]


def _poisoned(words, scale, zero):
    return words.fill_(-0x5A5A5A5A), scale.fill_(float("nan")), zero.fill_(float("nan"))


def _exclude(B, T):
    ex = torch.zeros(B, T, dtype=torch.bool, device=DEV)
    ex[0, :3] = True            # left padding inside the first group
    ex[-1, :T // 2 + 1] = True  # a whole group excluded: zero range, scale 1
    return ex


@pytest.mark.parametrize("bits,dtype,shape,G", KEY_CASES)
def test_pack_keys_equals_torch_quantizer(bits, dtype, shape, G):
    torch.manual_seed(bits)
    B, H, T, D = shape
    x = (torch.randn(shape, device=DEV) * torch.rand(1, 1, 1, D, device=DEV) * 4).to(dtype)
    ex = _exclude(B, T)
    fpi = kv_pack.codes_per_word(bits)
    out = _poisoned(torch.empty(B, H, T // fpi, D, dtype=torch.int32, device=DEV),
                    torch.empty(B, H, T // G, D, dtype=dtype, device=DEV),
                    torch.empty(B, H, T // G, D, dtype=dtype, device=DEV))
    words, scale, zero = kv_pack.pack_keys(x, bits, G, exclude=ex, out=out)
    ref = kv_pack.pack_keys_torch(x, bits, G, exclude=ex)
    assert torch.equal(words, ref[0]), f"{(words != ref[0]).sum()} words differ"
    assert torch.equal(scale, ref[1]) and torch.equal(zero, ref[2])
    # and the codes themselves are qeval.quant.quantize's, element for element
    q = quantize(x, bits, axis=-2, group_size=G, exclude=ex[:, None, :, None].expand_as(x))
    codes = kv_pack.unpack_codes(words, bits, axis=-2)
    assert torch.equal(codes.long(), q.codes.reshape(B, H, D, T).transpose(-1, -2).long())


@pytest.mark.parametrize("bits,dtype,T", VALUE_CASES)
def test_pack_values_equals_torch_quantizer(bits, dtype, T):
    torch.manual_seed(T + bits)
    B, H, D, G = 3, 3, 96, 32
    x = (torch.randn(B, H, T, D, device=DEV) * 3).to(dtype)
    ex = _exclude(B, T)
    fpi = kv_pack.codes_per_word(bits)
    out = _poisoned(torch.empty(B, H, T, D // fpi, dtype=torch.int32, device=DEV),
                    torch.empty(B, H, T, D // G, dtype=dtype, device=DEV),
                    torch.empty(B, H, T, D // G, dtype=dtype, device=DEV))
    words, scale, zero = kv_pack.pack_values(x, bits, G, exclude=ex, out=out)
    ref = kv_pack.pack_values_torch(x, bits, G, exclude=ex)
    assert torch.equal(words, ref[0]), f"{(words != ref[0]).sum()} words differ"
    assert torch.equal(scale, ref[1]) and torch.equal(zero, ref[2])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantized_error_is_half_a_step(bits):
    """Round-to-nearest: every real element lands within scale / 2 of itself."""
    x = torch.randn(1, 2, 64, 64, device=DEV)
    kw, ks, kz = kv_pack.pack_keys(x, bits, 32, param_dtype=torch.float32)
    vw, vs, vz = kv_pack.pack_values(x, bits, 32, param_dtype=torch.float32)
    k_err = (kv_pack.dequantize_keys(kw, ks, kz, bits, 32) - x).abs()
    v_err = (kv_pack.dequantize_values(vw, vs, vz, bits, 32) - x).abs()
    assert (k_err <= ks.repeat_interleave(32, dim=2) / 2 + 1e-5).all()
    assert (v_err <= vs.repeat_interleave(32, dim=3) / 2 + 1e-5).all()


def test_pack_codes_roundtrip_and_bad_layouts():
    for bits in (2, 4, 8):
        codes = torch.randint(0, 2**bits, (3, 64, 5))
        words = kv_pack.pack_codes(codes, bits, axis=1)
        assert words.dtype == torch.int32 and words.shape == (3, 64 * bits // 32, 5)
        assert torch.equal(kv_pack.unpack_codes(words, bits, axis=1).long(), codes)
    with pytest.raises(ValueError, match="bits=3"):
        kv_pack.pack_keys(torch.randn(1, 1, 32, 32, device=DEV), 3, 32)
    with pytest.raises(ValueError, match="group_size=24"):
        kv_pack.pack_values(torch.randn(1, 1, 4, 48, device=DEV), 4, 24)
    with pytest.raises(ValueError, match="T=33"):
        kv_pack.pack_keys(torch.randn(1, 1, 33, 32, device=DEV), 4, 32)
