"""The round-to-nearest primitives: identity at 16 bits, monotone error, groups vs outliers."""

import pytest
import torch

from qeval.quant.granularity import Granularity
from qeval.quant.primitives import dequantize, fake_quantize, packed_bytes, quantize, relative_error

torch.manual_seed(0)
# (name, tensor, granularity): one per target and layout the harness uses
CASES = [
    ("weight per channel", torch.randn(96, 256), Granularity(axis=-1)),
    ("weight group 64", torch.randn(96, 256), Granularity(axis=-1, group_size=64)),
    ("activation per token", torch.randn(2, 7, 256), Granularity(axis=-1)),
    ("kv per token", torch.randn(2, 4, 9, 32), Granularity(axis=-1)),
    ("kv per channel over tokens", torch.randn(2, 4, 32, 32), Granularity(axis=-2, group_size=16)),
    ("kv per sequence", torch.randn(2, 4, 9, 32), Granularity(per_sequence=True)),
]


@pytest.mark.parametrize("name,x,gran", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("symmetric", [False, True])
def test_error_falls_monotonically_with_bits(name, x, gran, symmetric):
    errors = [relative_error(x, gran.apply(x, b, symmetric)) for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0, f"{name}: errors at 2/4/8 bits = {errors}"
    assert errors[2] < 0.02, f"{name}: 8-bit error {errors[2]:.4f} is too large for round-to-nearest"


@pytest.mark.parametrize("name,x,gran", CASES, ids=[c[0] for c in CASES])
def test_sixteen_bits_is_the_identity(name, x, gran):
    assert gran.apply(x, 16, False) is x


def test_groups_beat_per_tensor_on_outlier_channels():
    # activations of LLMs have a few channels two orders of magnitude larger than the rest
    x = torch.randn(64, 512)
    x[:, [3, 100, 377]] *= 100.0
    per_tensor = relative_error(x, fake_quantize(x, 4, axis=None))
    grouped = relative_error(x, fake_quantize(x, 4, axis=-1, group_size=32))
    assert grouped < per_tensor / 3, (per_tensor, grouped)
    # on the channels without outliers the gap is far larger: per-tensor rounds them to nothing
    normal = torch.ones(512, dtype=torch.bool)
    normal[[3, 100, 377]] = False
    pt = relative_error(x[:, normal], fake_quantize(x, 4, axis=None)[:, normal])
    gr = relative_error(x[:, normal], fake_quantize(x, 4, axis=-1, group_size=32)[:, normal])
    assert pt > 5 * gr, (pt, gr)


def test_constant_groups_are_exact_not_nan():
    # max == min in every group: the scale guard must keep it finite and exact
    x = torch.full((4, 64), 3.25)
    out = fake_quantize(x, 2, axis=-1, group_size=16)
    assert torch.equal(out, x)
    assert torch.equal(fake_quantize(torch.zeros(8, 8), 4, axis=None), torch.zeros(8, 8))


def test_codes_scales_and_levels():
    x = torch.linspace(-1, 1, 64).reshape(2, 32)
    q = quantize(x, 3, axis=-1)
    assert q.codes.min() == 0 and q.codes.max() == 7  # 2**3 - 1 levels above zero
    assert q.scale.shape == (2, 1, 1)
    # endpoints are representable exactly under asymmetric min-max
    out = dequantize(q, x, axis=-1)
    assert torch.allclose(out[:, 0], x[:, 0]) and torch.allclose(out[:, -1], x[:, -1])
    qs = quantize(x, 4, axis=-1, symmetric=True)
    assert qs.codes.min() >= -8 and qs.codes.max() <= 7 and torch.all(qs.zero == 0)


def test_excluded_elements_do_not_move_statistics():
    x = torch.randn(1, 1, 8, 4)
    x_pad = x.clone()
    x_pad[:, :, :3] = 1000.0  # left padding with garbage
    exclude = torch.zeros(1, 1, 8, 1, dtype=torch.bool)
    exclude[:, :, :3] = True
    gran = Granularity(axis=-2)  # per channel over tokens: padding would dominate min/max
    out = gran.apply(x_pad, 2, False, exclude)
    ref = gran.apply(x[:, :, 3:], 2, False)
    assert torch.allclose(out[:, :, 3:], ref)


def test_packed_bytes_formula():
    # 4096 elements at 4 bits in groups of 128: 2048 bytes of codes + 32 groups x (fp16 scale + zero)
    assert packed_bytes(4096, 4, 128) == 2048 + 32 * 4
    assert packed_bytes(4096, 16, 128) == 8192
    assert packed_bytes(4096, 2, None, n_groups=32, symmetric=True) == 1024 + 32 * 2


def test_rejects_widths_that_are_not_quantized():
    with pytest.raises(ValueError):
        quantize(torch.randn(4, 4), 9)
    with pytest.raises(ValueError):
        quantize(torch.randn(4, 4), 1, symmetric=True)
    with pytest.raises(ValueError, match="does not divide"):
        quantize(torch.randn(4, 30), 4, axis=-1, group_size=8)
