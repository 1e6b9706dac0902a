"""AWQ: the scale search picks the grid point a literal loop over the ratios finds and, on planted
outlier input channels, beats round-to-nearest at W3; the clip search picks each group's best
shrink; folding the scales leaves the full-precision model's output unchanged (Llama with and
without GQA, Qwen2, OPT); a saved result rebuilds the same weights on a fresh model."""

from __future__ import annotations

import copy

import pytest
import torch
from method_configs import make_method
from tiny_models import FAMILIES, tiny_model
from torch import nn

from qeval.methods.awq import search_clip, search_scale
from qeval.quant.primitives import fake_quantize

BITS, GROUP = 3, 32


def quantize(w):
    """llm-awq's pseudo_quantize_tensor: integer zero point, groups along the last dimension."""
    return fake_quantize(w, BITS, -1, GROUP if w.dim() == 2 else None, zero_point="integer")


def outlier_linear(seed=0):
    g = torch.Generator().manual_seed(seed)
    fc = nn.Linear(128, 64, bias=False)
    fc.weight.data = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(1, 300, 128, generator=g)
    x[..., [5, 40, 77, 100]] *= 20          # salient input channels
    return fc, x


def test_scale_search_is_the_literal_argmin_and_beats_round_to_nearest():
    fc, x = outlier_linear()
    w, ref = fc.weight.data.clone(), x @ fc.weight.data.T
    s = search_scale(fc, [fc], [x], [{}], quantize, 20)
    assert torch.equal(fc.weight.data, w), "the search leaves the weights as they were"
    x_mean = x.reshape(-1, 128).abs().mean(0)
    losses = []
    for i in range(20):   # auto_scale.py _search_module_scale, written out
        t = x_mean.pow(i / 20).clamp(min=1e-4)
        t = t / (t.max() * t.min()).sqrt()
        losses.append(float((ref - x @ (quantize(w * t) / t).T).pow(2).mean()))
    best = min(range(20), key=losses.__getitem__)
    t = x_mean.pow(best / 20).clamp(min=1e-4)
    assert torch.equal(s, t / (t.max() * t.min()).sqrt())
    err_awq = (ref - (x / s) @ quantize(w * s).T).norm()
    err_rtn = (ref - x @ quantize(w).T).norm()
    assert best > 0 and err_awq < 0.8 * err_rtn, (best, float(err_awq), float(err_rtn))


def test_clip_search_keeps_each_groups_least_error_shrink():
    fc, x = outlier_linear(1)
    w, x2 = fc.weight.data, x.reshape(-1, 128)
    got = search_clip(w, x2, GROUP, quantize, 20, 0.5)               # (64, 4, 1)
    step = max(1, x2.shape[0] // 512)
    xs = x2[::step]
    for row in (0, 17, 63):
        for grp in range(128 // GROUP):
            cols = slice(grp * GROUP, (grp + 1) * GROUP)
            wg, amax = w[row, cols], w[row, cols].abs().max()
            errs = []
            for i in range(10):          # shrink 0 %, 5 %, ..., 45 %
                m = amax * (1 - i / 20)
                q = fake_quantize(torch.clamp(wg, -m, m)[None], BITS, -1, None, zero_point="integer")[0]
                errs.append(float((xs[:, cols] @ q - xs[:, cols] @ wg).pow(2).mean()))
            i = min(range(10), key=errs.__getitem__)
            assert torch.isclose(got[row, grp, 0], amax * (1 - i / 20)), (row, grp)


def samples(n=3, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 90, (1, length), generator=g) for _ in range(n)]


def tiny(family, **overrides):
    saved = FAMILIES[family]
    FAMILIES[family] = saved | overrides
    try:
        return tiny_model(family, dtype=torch.float64)[0]
    finally:
        FAMILIES[family] = saved


@pytest.mark.parametrize("family,overrides,fc_fc", [
    ("llama", {}, 1),                              # GQA: v -> o is not folded
    ("llama", {"num_key_value_heads": 4}, 2),
    ("qwen2", {}, 1),
    ("opt", {}, 2),
])
def test_folding_the_scales_leaves_the_full_precision_output_unchanged(family, overrides, fc_fc):
    model = tiny(family, **overrides)
    ids = torch.cat(samples(2, seed=5))
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    method = make_method("awq", w_bits=BITS, w_group_size=GROUP, auto_clip=False)
    result = method.calibrate(model, samples())
    with torch.no_grad():
        after = model(input_ids=ids, use_cache=False).logits
    # per layer (two): the norm before attention and before the MLP, up -> down, and v -> o
    # where attention has no GQA (AWQ's shape rule)
    assert len(result["scale"]) == 2 * (2 + fc_fc) and result["clip"] == []
    # each fold rounds a weight twice, relative 2**-53 each; a wrong fold moves logits by O(1)
    assert (after - before).abs().max() <= 1e-9 * before.abs().max()


def test_a_saved_result_rebuilds_the_same_weights_on_a_fresh_model():
    model, _ = tiny_model("llama")
    fresh = copy.deepcopy(model)
    method = make_method("awq", w_bits=BITS, w_group_size=GROUP)
    result = method.calibrate(model, samples())
    assert result["clip"], "v, o, gate, up, down are clipped"
    assert not any(".q_proj" in n or ".k_proj" in n for n, _ in result["clip"])
    make_method("awq", w_bits=BITS, w_group_size=GROUP).apply_calibration(fresh, result)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
