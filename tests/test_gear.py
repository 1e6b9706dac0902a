"""GEAR (arXiv 2403.05527): no outliers and rank 0 is exactly the backbone; outliers + low rank
never increase the backbone's error; 2**bits - 1 levels (7 at 3 bits, not the reference's 8)."""

import pytest
import torch
from kv_method_helpers import make_method

from qeval.kv.sequence import SequenceState
from qeval.quant.decompose import gear_compress, levels, low_rank, outlier_mask
from qeval.quant.primitives import quantize, relative_error


def _x(seed=0, n=64, d=16):
    torch.manual_seed(seed)
    x = torch.randn(2, 2, n, d)
    x[..., 5] *= 8                                  # outlier channel
    x.view(-1)[torch.randint(0, x.numel(), (20,))] *= 25   # scattered outliers
    return x


@pytest.mark.parametrize("backbone", ["kivi", "uniform"])
@pytest.mark.parametrize("which", ["k", "v"])
def test_no_outliers_and_rank_zero_is_exactly_the_backbone(backbone, which):
    m = make_method("gear", bits=2, backbone=backbone, outlier_ratio=0.0, rank_prefill=0, rank_decode=0)
    x = _x()
    q = m.quantizer(which)
    y, n_out, r = gear_compress(x, 2, q, 0.0, 0, 3)
    assert torch.equal(y, q(x, None)) and n_out == 0 and r == 0


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("backbone", ["kivi", "uniform"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_never_exceeds_the_backbones(bits, backbone, seed):
    m = make_method("gear", bits=bits, backbone=backbone)
    x = _x(seed)
    for which in ("k", "v"):
        q = m.quantizer(which)
        base = relative_error(x, q(x, None))
        with_outliers = relative_error(x, gear_compress(x, bits, q, 0.02, 0, 3)[0])
        full = relative_error(x, gear_compress(x, bits, q, 0.02, 4, 3)[0])
        assert full <= with_outliers + 1e-6 and with_outliers <= base, (base, with_outliers, full)


def test_three_bits_use_seven_levels():
    assert [levels(b) for b in (2, 3, 4, 8)] == [3, 7, 15, 255]
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 2, 32)
    m = make_method("gear", bits=3, backbone="uniform", outlier_ratio=0.0, rank_prefill=0)
    y = m.quantizer("v")(x, None)
    assert len(torch.unique(y[0, 0, 0])) == 8              # codes 0..7: 7 steps between min and max
    assert int(quantize(x, 3, -1).codes.max()) == 7
    assert torch.isclose(y[0, 0, 0].max(), x[0, 0, 0].max()) and torch.isclose(y[0, 0, 0].min(), x[0, 0, 0].min())


def test_outliers_are_top_and_bottom_and_stored_exactly():
    x = _x()
    mask = outlier_mask(x, 0.02)
    k = int(0.01 * 64 * 16)
    assert int(mask[0, 0].sum()) == 2 * k
    top = x[0, 0].flatten().topk(k).indices
    assert mask[0, 0].flatten()[top].all()
    m = make_method("gear", bits=2, backbone="kivi")
    y, _, _ = gear_compress(x, 2, m.quantizer("k"), 0.02, 0, 3)
    assert torch.equal(y[mask], x[mask])


def test_low_rank_recovers_a_low_rank_error_and_never_grows_it():
    torch.manual_seed(0)
    e = torch.randn(3, 40, 2) @ torch.randn(3, 2, 16)          # rank 2
    assert relative_error(e, low_rank(e, 2, 3)) < 1e-4
    noise = torch.randn(3, 40, 16)
    assert relative_error(noise, low_rank(noise, 4, 3)) < 1.0


def test_streaming_blocks_and_prefill_rank():
    m = make_method("gear", bits=2, stream_block=16)
    ranks = []
    compress = m.compress
    m.compress = lambda x, which, first: ranks.append((which, x.shape[-2], m.rank(first, *x.shape[-2:]))) or compress(x, which, first)
    layer = m.make_cache_layer(0, SequenceState())
    layer.update(torch.randn(1, 2, 37, 16), torch.randn(1, 2, 37, 16))
    for _ in range(20):
        layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    layer.settle()
    assert ranks == [("k", 32, 4), ("v", 32, 4), ("k", 16, 2), ("v", 16, 2)]
