"""GEAR (arXiv 2403.05527): no outliers and rank 0 is exactly the backbone; outliers + low rank
never increase the backbone's error; 2**bits - 1 levels (7 at 3 bits, not the reference's 8); the
paper's outlier rule is the default, and ``outlier_rule=reference_code`` is the authors' code's,
pinned against a transcription of it."""

import pytest
import torch
from kv_method_helpers import make_method, make_part
from method_configs import check_params, from_knobs, method_params
from omegaconf import OmegaConf

from qeval.errors import ConfigError
from qeval.kv.sequence import SequenceState
from qeval.methods.base import Bits, Knobs
from qeval.quant.decompose import (
    gear_compress,
    levels,
    low_rank,
    outlier_mask,
    reference_outliers,
    reference_outliers_per_side,
)
from qeval.methods.kivi import fake_quantize_keys
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
    m = make_part("gear", bits=2, backbone=backbone, outlier_ratio=0.0, rank_prefill=0, rank_decode=0)
    x = _x()
    q = m.quantizer(which)
    y, n_out, r = gear_compress(x, 2, q, 0.0, 0, 3)
    assert torch.equal(y, q(x, None)) and n_out == 0 and r == 0


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("backbone", ["kivi", "uniform"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_never_exceeds_the_backbones(bits, backbone, seed):
    m = make_part("gear", bits=bits, backbone=backbone)
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
    m = make_part("gear", bits=3, backbone="uniform", outlier_ratio=0.0, rank_prefill=0)
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
    m = make_part("gear", bits=2, backbone="kivi")
    y, _, _ = gear_compress(x, 2, m.quantizer("k"), 0.02, 0, 3)
    assert torch.equal(y[mask], x[mask])


def test_low_rank_recovers_a_low_rank_error_and_never_grows_it():
    torch.manual_seed(0)
    e = torch.randn(3, 40, 2) @ torch.randn(3, 2, 16)          # rank 2
    assert relative_error(e, low_rank(e, 2, 3)) < 1e-4
    noise = torch.randn(3, 40, 16)
    assert relative_error(noise, low_rank(noise, 4, 3)) < 1.0


def test_streaming_blocks_and_prefill_rank():
    m = make_part("gear", bits=2, stream_block=16)
    ranks = []
    compress = m.compress
    m.compress = lambda x, which, first: ranks.append((which, x.shape[-2], m._rank(first, *x.shape[-2:]))) or compress(x, which, first)
    layer = m.make_cache_layer(0, SequenceState())
    layer.update(torch.randn(1, 2, 37, 16), torch.randn(1, 2, 37, 16))
    for _ in range(20):
        layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    layer.settle()
    assert ranks == [("k", 32, 4), ("v", 32, 4), ("k", 16, 2), ("v", 16, 2)]


# -- outlier_rule=reference_code: the authors' code's rule -------------------------------------

def _reference_selection(input, sparsity, which):
    """GEAR @ efe0bfe2b5a3, GenerationBench/GenerationTest/GEARLM/Simulated/compress_function.py,
    ``gears_channelQ`` (keys, lines 262-284) and ``gears_tokenQ`` (values, lines 298-320) up to
    the call of the quantizer, transcribed: what the quantizer sees, and the two index sets."""
    output = input.float()
    batch, num_head, seq_len, sep_dim = output.shape
    element_num = batch * num_head * seq_len * sep_dim
    sparsity_num = int(element_num * sparsity)
    sparsity_pertoken = int(sparsity_num / batch / seq_len / 2)
    if which == "k":
        output = output.permute(0, 1, 3, 2).contiguous().view(batch, sep_dim * num_head, seq_len)
    else:
        output = output.permute(0, 2, 1, 3).contiguous().view(batch, seq_len, sep_dim * num_head)
    smallest_value, smallest_indices = torch.topk(output, sparsity_pertoken, dim=-1, largest=False)
    largest_value, largest_indices = torch.topk(output, sparsity_pertoken, dim=-1, largest=True)
    average = output.mean(dim=-1, keepdim=True)
    expanded_average = average.expand_as(output)
    output.scatter_(-1, smallest_indices, expanded_average.gather(-1, smallest_indices))
    output.scatter_(-1, largest_indices, expanded_average.gather(-1, largest_indices))
    if which == "k":
        output = output.view(batch, num_head, sep_dim, seq_len).permute(0, 1, 3, 2)
    else:
        output = output.view(batch, seq_len, num_head, sep_dim).permute(0, 2, 1, 3)
    return output, (smallest_indices, smallest_value), (largest_indices, largest_value)


def _reference_gears(input, quantize_bit, group_size, sparsity, which, levels=None):
    """The rest of ``gears_channelQ`` / ``gears_tokenQ`` (lines 285-295 / 321-332) with the
    quantizers they call, ``fake_groupwise_{channel,token}_asymmetric_quantization_cluster``
    (lines 100-130 / 132-160), transcribed; the final ``.half()`` is left out to compare in fp32.
    ``levels``: None is the reference's ``quantize_bit ** 2 - 1``. Keys past the last whole group
    of tokens are left as they are (lines 108-111, 121)."""
    output, (si, sv), (li, lv) = _reference_selection(input, sparsity, which)
    batch, num_head, seq_len, sep_dim = output.shape
    cluster_num = quantize_bit ** 2 - 1 if levels is None else levels
    x = output.permute(0, 2, 1, 3).contiguous().view(batch, seq_len, sep_dim * num_head)
    residual = x[:, seq_len // group_size * group_size:, :] if which == "k" else None
    if which == "k":
        group_num = seq_len // group_size
        fixed_input = x[:, :group_num * group_size, :].reshape(batch, group_num, group_size, num_head * sep_dim)
        mx, mn = fixed_input.max(dim=-2)[0].unsqueeze(-2), fixed_input.min(dim=-2)[0].unsqueeze(-2)
    else:
        fixed_input = x.view(batch, seq_len, (sep_dim * num_head) // group_size, group_size)
        mx, mn = fixed_input.max(dim=-1)[0].unsqueeze(-1), fixed_input.min(dim=-1)[0].unsqueeze(-1)
    scale = (mx - mn) / cluster_num
    q = torch.nn.functional.relu((fixed_input - mn) / scale).round_() * scale + mn
    if which == "k":
        q = torch.cat((q.reshape(batch, -1, num_head * sep_dim), residual), dim=1)
    out = q.reshape(batch, seq_len, num_head, sep_dim).permute(0, 2, 1, 3)
    if which == "k":
        out = out.permute(0, 1, 3, 2).contiguous().view(batch, sep_dim * num_head, seq_len)
        out.scatter_(-1, si, sv)
        out.scatter_(-1, li, lv)
        return out.view(batch, num_head, sep_dim, seq_len).permute(0, 1, 3, 2)
    out = out.permute(0, 2, 1, 3).contiguous().view(batch, seq_len, sep_dim * num_head)
    out.scatter_(-1, si, sv)
    out.scatter_(-1, li, lv)
    return out.view(batch, seq_len, num_head, sep_dim).permute(0, 2, 1, 3)


def _mask_from(indices, shape, which):
    """The two index sets of ``_reference_selection`` as a (B, H, n, D) mask."""
    b, h, n, d = shape
    rows = (b, h * d, n) if which == "k" else (b, n, h * d)
    m = torch.zeros(rows, dtype=torch.bool)
    for idx in indices:
        m.scatter_(-1, idx, True)
    if which == "k":
        return m.view(b, h, d, n).transpose(-1, -2)
    return m.view(b, n, h, d).transpose(1, 2)


# (B=1, H=2, n=4, D=2); s = 0.5 gives int(int(16 * 0.5) / 4 / 2) = 1 outlier at each end of a row
HAND = torch.tensor([[[1., -4], [9, 0], [-3, 2], [0, 6]],
                     [[5, 1], [-2, 3], [4, -8], [7, 2]]])[None]


def test_reference_rule_on_a_hand_checked_block():
    # keys, per channel over the 4 tokens: (h0, d0) [1, 9, -3, 0] keeps 9 and -3, mean 1.75 ...
    mask, seen = reference_outliers(HAND, 0.5, "k")
    assert mask[0].int().tolist() == [[[0, 1], [1, 0], [1, 0], [0, 1]], [[0, 0], [1, 1], [0, 1], [1, 0]]]
    assert seen[0].tolist() == [[[1, 1], [1.75, 0], [1.75, 2], [0, 1]], [[5, 1], [3.5, -0.5], [4, -0.5], [3.5, 2]]]
    # values, per token across both heads: t0 [1, -4 | 5, 1] keeps -4 and 5, mean 0.75 ...
    mask, seen = reference_outliers(HAND, 0.5, "v")
    assert mask[0].int().tolist() == [[[0, 1], [1, 0], [0, 0], [1, 0]], [[1, 0], [1, 0], [1, 1], [1, 0]]]
    assert seen[0].tolist() == [[[1, 0.75], [2.5, 0], [-3, 2], [3.75, 6]], [[0.75, 1], [2.5, 3], [-1.25, -1.25], [3.75, 2]]]
    # the mean widens min/max where the paper's rule excludes: channel (h0, d0) keeps [1, 0] and
    # quantizes over [0, 1.75], not [0, 1]; head 1 gets 3 value outliers at t2, head 0 none
    for which in "kv":
        ref, small, large = _reference_selection(HAND, 0.5, which)
        mask, seen = reference_outliers(HAND, 0.5, which)
        assert torch.equal(seen, ref) and torch.equal(mask, _mask_from((small[0], large[0]), HAND.shape, which))


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_rule_reproduces_the_reference_at_two_bits(seed):
    """At 2 bits the reference's ``bits**2 - 1`` levels are 2**2 - 1, so GEAR with
    ``outlier_rule=reference_code``, the KIVI backbone and no low rank is the reference's
    ``gears_channelQ`` / ``gears_tokenQ``."""
    torch.manual_seed(seed)
    x = torch.randn(1, 4, 32, 16)
    x[..., 3] *= 6
    m = make_part("gear", bits=2, backbone="kivi", group_size=8, outlier_ratio=0.1,
                    outlier_rule="reference_code", rank_prefill=0)
    assert reference_outliers_per_side(0.1, 4, 32, 16) == 3        # of 32 tokens per key channel
    for which in "kv":
        ref, small, large = _reference_selection(x, 0.1, which)
        mask, seen = reference_outliers(x, 0.1, which)
        assert torch.equal(mask, _mask_from((small[0], large[0]), x.shape, which)) and torch.equal(seen, ref)
        y = m.compress(x, which, True)[0]
        torch.testing.assert_close(y, _reference_gears(x, 2, 8, 0.1, which), rtol=0, atol=1e-5)
        assert torch.equal(y[mask], x[mask])


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_the_level_count_is_2_to_the_bits_minus_1_which_the_reference_matches_only_at_2_and_4_bits(bits):
    """The reference quantizes with ``bits**2 - 1`` levels: 9 codes at 3 bits (more than 3 bits
    hold), 63 at 8. qeval keeps the paper's ``2**bits - 1`` (README, deviations): equal to the
    transcription given those levels, and to the reference itself where the two counts agree."""
    torch.manual_seed(bits)
    x = torch.randn(1, 4, 32, 16)
    m = make_part("gear", bits=bits, backbone="kivi", group_size=8, outlier_ratio=0.1,
                  outlier_rule="reference_code", rank_prefill=0)
    for which in "kv":
        y = m.compress(x, which, True)[0]
        # the reference's float32 arithmetic against qeval's: one rounding of a level step
        torch.testing.assert_close(y, _reference_gears(x, bits, 8, 0.1, which, levels=2**bits - 1), rtol=0, atol=1e-5)
        as_reference = _reference_gears(x, bits, 8, 0.1, which)
        assert torch.allclose(y, as_reference, rtol=0, atol=1e-5) == (bits ** 2 == 2 ** bits)


def test_keys_at_an_odd_length_are_all_quantized_where_the_reference_keeps_the_tail():
    """37 tokens, groups of 8: the reference quantizes tokens 0-31 in four groups and leaves 32-36
    in full precision; qeval (``simulated``, one pass) quantizes every token, the first 5 in a
    group of their own, as KIVI groups keys (README, deviations). At a multiple of 8 they agree."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 37, 16)
    m = make_part("gear", bits=2, backbone="kivi", group_size=8, outlier_ratio=0.0,
                  outlier_rule="reference_code", rank_prefill=0)
    ours, theirs = m.compress(x, "k", True)[0], _reference_gears(x, 2, 8, 0.0, "k")
    assert torch.equal(theirs[:, :, 32:], x[:, :, 32:])
    assert (ours[:, :, 32:] != x[:, :, 32:]).any()
    assert torch.equal(ours, fake_quantize_keys(x, 2, 8))
    torch.testing.assert_close(m.compress(x[:, :, :32], "k", True)[0], theirs[:, :, :32], rtol=0, atol=1e-5)


def test_reference_rule_keeps_every_key_when_its_count_exceeds_the_block():
    """int(s H D / 2) per side does not shrink with the block: past n the reference's topk would
    fail; every entry is kept."""
    x = torch.randn(1, 4, 8, 16)
    assert reference_outliers_per_side(0.5, 4, 8, 16) == 16
    mask, _ = reference_outliers(x, 0.5, "k")
    assert mask.all()
    mask, _ = reference_outliers(x, 0.5, "v")
    assert (mask.reshape(1, 4, 8, 16).transpose(1, 2).reshape(8, 64).sum(-1) == 32).all()
    m = make_part("gear", bits=2, outlier_ratio=0.5, outlier_rule="reference_code", group_size=8, rank_prefill=0)
    assert torch.equal(m.compress(x, "k", True)[0], x)


@pytest.mark.parametrize("backbone", ["kivi", "uniform"])
def test_the_paper_rule_is_the_default_and_unchanged(backbone):
    m = make_part("gear", bits=2, backbone=backbone)
    assert m.params.outlier_rule == "paper" and m._outliers("k") is None
    assert make_method("gear", bits=2, backbone=backbone).describe()["method.outlier_rule"] == "paper"
    x = _x()
    for which in "kv":
        q = m.quantizer(which)
        mask = outlier_mask(x, 0.02)
        bare = make_part("gear", bits=2, backbone=backbone, rank_prefill=0).compress(x, which, True)[0]
        assert torch.equal(bare, torch.where(mask, x, q(x, mask)))          # exact outliers, kept out of min/max
        assert torch.equal(m.compress(x, which, True)[0], gear_compress(x, 2, q, 0.02, 4, 3)[0])


def test_reference_rule_runs_in_both_semantics_and_is_recorded():
    kw = {"outlier_rule": "reference_code", "outlier_ratio": 0.5, "group_size": 8, "stream_block": 16}
    m = make_part("gear", 2, "cache", **kw)
    assert make_method("gear", 2, "cache", **kw).describe()["method.outlier_rule"] == "reference_code"
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 37, 16), torch.randn(1, 2, 37, 16)
    layer = m.make_cache_layer(0, SequenceState())
    layer.update(k, v)
    layer.settle()
    keys, values = layer.keys, layer.values
    assert torch.equal(keys[:, :, :32], m.compress(k[:, :, :32], "k", True)[0])
    assert torch.equal(values[:, :, :32], m.compress(v[:, :, :32], "v", True)[0])
    paper = make_part("gear", 2, "cache", **(kw | {"outlier_rule": "paper"}))
    assert not torch.equal(keys[:, :, :32], paper.compress(k[:, :, :32], "k", True)[0])
    sk, sv = make_part("gear", 2, "simulated", **kw).quantize_kv(k, v)
    assert torch.equal(sk, m.compress(k, "k", True)[0]) and torch.equal(sv, m.compress(v, "v", True)[0])


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_outlier_rule_check(backend):
    def check(rule):
        check_params(OmegaConf.create({"method": method_params("gear", outlier_rule=rule), "backend": backend}))
    check("paper")
    with pytest.raises(ConfigError, match=r"^method.outlier_rule=bogus: allowed: paper, reference_code$"):
        check("bogus")
    if backend != "triton":
        check("reference_code")
        return
    with pytest.raises(ConfigError) as e:
        check("reference_code")
    assert str(e.value).startswith("method.outlier_rule=reference_code: backend=triton allows only paper")
    assert "\n" not in str(e.value)


def test_reference_rule_runs_on_torch_when_triton_is_resolved():
    """backend=auto resolves to triton on CUDA; the packed cache holds the paper's outliers only."""
    m = from_knobs("gear", method_params("gear", outlier_rule="reference_code", group_size=8),
                   Knobs(Bits(16, 16, 2, 2), kv_semantics="cache", backend="triton"))
    assert m.kv_backend == "torch" and m.describe()["kv_backend"] == "torch"


def test_the_power_iteration_start_is_seeded_and_shared_so_a_head_compresses_the_same_anywhere():
    # the reference draws torch.rand per (batch, head) on every call and orthogonalises only in the
    # last iteration; qeval's start is a seeded normal (D, r) shared by every row and head, with a
    # QR every iteration: the global RNG, the batch and the other heads never change a head's fit
    torch.manual_seed(0)
    e = torch.randn(2, 3, 40, 16)
    whole = low_rank(e, 4, 3)
    torch.manual_seed(123)                      # another global RNG state changes nothing
    assert torch.equal(low_rank(e, 4, 3), whole)
    for b in range(2):
        for h in range(3):
            assert torch.equal(low_rank(e[b:b + 1, h:h + 1], 4, 3), whole[b:b + 1, h:h + 1])
