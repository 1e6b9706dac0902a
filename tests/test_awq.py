"""AWQ: the scale search picks the grid point a literal loop over the ratios finds and, on planted
outlier input channels, beats round-to-nearest at W3; the clip search picks each group's best
shrink; folding the scales leaves the full-precision model's output unchanged (Llama with and
without GQA, Qwen2, OPT); a saved result rebuilds the same weights on a fresh model; an llm-awq
``awq_cache`` file (``method.scales_file``) rebuilds exactly qeval's own calibrated model, and one
that does not fit is a one-line error naming the file and the entry."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from hydra import compose, initialize_config_dir
from method_configs import make_method
from tiny_models import FAMILIES, tiny_model
from torch import nn

from qeval.calibration import store
from qeval.errors import ConfigError
from qeval.methods.awq import search_clip, search_scale
from qeval.model import loading
from qeval.model.linear import quantize_linears
from qeval.quant.primitives import fake_quantize
from qeval.run import prepare
from qeval.validate import CONFIG_DIR, validate

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


def test_the_clip_search_runs_in_float16_where_its_starting_error_is_inf():
    # llm-awq starts the search from ones * 1e9, which float16 holds as inf (the authors' default
    # dtype); the first shrink is then always better, as there, and no float16 constant overflows
    fc, x = outlier_linear(1)
    w, xs = fc.weight.data.half(), x[0].half()
    got = search_clip(w, xs, GROUP, quantize, n_grid=20, max_shrink=0.5)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    # every group keeps a shrink of its own amax that the float16 loop found best
    amax = w.reshape(w.shape[0], -1, GROUP).abs().amax(-1, keepdim=True)
    ratios = (got / amax).float()
    assert bool(((ratios <= 1) & (ratios >= 0.5 - 1e-3)).all())


@pytest.mark.parametrize("family,overrides,fc_fc", [
    ("llama", {}, 1),                              # GQA: v -> o is not folded
    ("llama", {"num_key_value_heads": 4}, 2),
    ("qwen2", {}, 1),
    ("qwen3", {}, 1),                              # q/k norms after the projections: untouched
    ("opt", {}, 2),
])
def test_folding_the_scales_leaves_the_full_precision_output_unchanged(family, overrides, fc_fc):
    model = tiny(family, **overrides)
    ids = torch.cat(samples(2, seed=5))
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    method = make_method("awq", w_bits=BITS, w_group_size=GROUP, auto_clip=False)
    result = method.weight.calibrate(model, samples())
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
    result = method.weight.calibrate(model, samples())
    assert result["clip"], "v, o, gate, up, down are clipped"
    assert not any(".q_proj" in n or ".k_proj" in n for n, _ in result["clip"])
    make_method("awq", w_bits=BITS, w_group_size=GROUP).weight.apply_calibration(fresh, result)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------- published files
def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def authors_cache(result) -> dict:
    """``result`` written the way llm-awq's ``run_awq`` builds ``awq_results`` (pre_quant.py): a list
    of (prev_op_name, tuple of layer names, scales) and of (layer name, max_val (out, groups, 1))."""
    return {"scale": [(prev, tuple(names), s.detach().cpu()) for prev, names, s in result["scale"]],
            "clip": [(name, max_val.detach().cpu()) for name, max_val in result["clip"]]}


def test_an_awq_cache_file_rebuilds_qevals_own_calibrated_model_exactly(tmp_path):
    model, _ = tiny_model("llama")
    fresh = copy.deepcopy(model)
    result = make_method("awq", w_bits=BITS, w_group_size=GROUP).weight.calibrate(model, samples())
    path = tmp_path / "llama-w3-g32.pt"
    torch.save(authors_cache(result), path)
    method = make_method("awq", w_bits=BITS, w_group_size=GROUP, scales_file=str(path))
    method.weight.apply_calibration(fresh, method.calibrator().read_scales_file(path))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.cat(samples(2, seed=7))
    q = {}
    for key, m in (("computed", model), ("file", fresh)):
        quantize_linears(m, method, "torch")
        with torch.no_grad():
            q[key] = m(input_ids=ids, use_cache=False).logits
    assert torch.equal(q["computed"], q["file"])


def test_the_saved_result_is_a_scales_file_and_a_run_from_it_names_the_file(tmp_path):
    # the calibration store's result.pt is itself an awq_cache file: a run given it applies exactly
    # the calibrated model, reads no data, saves nothing, and its rows say where the numbers came from
    common = ["model=tiny-random", "device=cpu", "method=awq", f"w_bits={BITS}", f"w_group_size={GROUP}",
              "task=quant_error", f"results_dir={tmp_path}"]
    model, _ = loading.load(compose_cfg(*common).model, "cpu", "float32", "sdpa", 0)
    method = make_method("awq", w_bits=BITS, w_group_size=GROUP)
    store.write(tmp_path / "saved", method.weight.calibrate(model, samples()), {})
    path = tmp_path / "saved" / store.RESULT
    cfg = compose_cfg(*common, f"method.scales_file={path}")
    handle, facts = prepare(cfg)
    quantize_linears(model, method, "torch")
    ids = torch.cat(samples(2, seed=7))
    with torch.no_grad():
        assert torch.equal(handle.model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert facts["calibration.file"] == str(path) and facts["calibration.format"] == "llm-awq"
    assert facts["calibration.hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # facts are the run's row columns (qeval.run._compute: base_row | facts)
    assert facts["calibration.dataset"] is None and facts["calibration_reused"] is False
    assert not (tmp_path / "calibration").exists()


def bad_cache(tmp_path, edit) -> str:
    model, _ = tiny_model("llama")
    result = make_method("awq", w_bits=BITS, w_group_size=GROUP, auto_clip=False).weight.calibrate(model, samples(1))
    result["clip"] = [("model.layers.0.mlp.down_proj", torch.ones(64, 4, 1))]
    cache = authors_cache(result)
    edit(cache)
    torch.save(cache, tmp_path / "c.pt")
    return str(tmp_path / "c.pt")


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["scale"].__setitem__(0, ("model.layers.9.input_layernorm",) + c["scale"][0][1:]),
     "scale[0] names model.layers.9.input_layernorm, which model LlamaForCausalLM does not have"),
    (lambda c: c["scale"].__setitem__(1, c["scale"][1][:2] + (torch.ones(7),)),
     "scale[1] has 7 scales; allowed: 64 (the input width of model.layers.0.mlp.gate_proj, "
     "model.layers.0.mlp.up_proj; model.layers.0.post_attention_layernorm has 64 channels)"),
    (lambda c: c["clip"].__setitem__(0, ("model.layers.0.mlp.down_proj", torch.ones(64, 3, 1))),
     "clip[0] (model.layers.0.mlp.down_proj) has max_val of shape (64, 3, 1); allowed: (64, groups dividing 128, 1)"),
    (lambda c: c["scale"].__setitem__(0, ("model.layers.0.mlp.act_fn",) + c["scale"][0][1:]),
     "scale[0] folds into model.layers.0.mlp.act_fn, a SiLUActivation; allowed: an nn.Linear or one of"),
])
def test_a_cache_that_does_not_fit_the_model_is_one_line_naming_file_and_entry(tmp_path, edit, message):
    path = bad_cache(tmp_path, edit)
    method = make_method("awq", w_bits=BITS, w_group_size=GROUP, scales_file=path)
    result = method.calibrator().read_scales_file(path)             # the structure is fine: only the model can tell
    with pytest.raises(ConfigError) as e:
        method.weight.apply_calibration(tiny_model("llama")[0], result)
    assert str(e.value).startswith(f"method.scales_file={path}: {message}") and "\n" not in str(e.value)


@pytest.mark.parametrize("content,message", [
    ({"scale": [("a", ("b",))], "clip": []}, "scale[0] is not (prev_op name, (linear names), 1-D float scales)"),
    ({"scale": [], "clip": [("a", torch.ones(4, 2))]}, "clip[0] is not (linear name, max_val of shape (out, groups, 1))"),
    ({"model.layers.0.self_attn.q_proj": torch.ones(4)}, "is a SmoothQuant act_scales dict (method=smoothquant"),
    ([1, 2], "holds a list that is not an llm-awq cache"),
    # values llm-awq's asserts stop: they would run to non-finite logits with status ok
    ({"scale": [("a", ("b",), torch.tensor([1.0, float("nan")]))], "clip": []},
     "scale[0] (a) holds a value that is not a finite positive number"),
    ({"scale": [("a", ("b",), torch.tensor([1.0, float("inf")]))], "clip": []},
     "scale[0] (a) holds a value that is not a finite positive number"),
    ({"scale": [], "clip": [("a", torch.full((4, 2, 1), float("nan")))]}, "clip[0] (a) holds NaN or a negative max_val"),
    ({"scale": [], "clip": [], "extra": 1}, "is an llm-awq cache with other keys too (extra)"),
])
def test_a_file_of_the_wrong_structure_is_refused_before_the_model_loads(tmp_path, content, message):
    torch.save(content, tmp_path / "c.pt")
    cfg = compose_cfg("model=tiny-random", "method=awq", "w_bits=4", f"results_dir={tmp_path}",
                      f"method.scales_file={tmp_path / 'c.pt'}")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).startswith(f"method.scales_file={tmp_path / 'c.pt'}: {message}"), str(e.value)
    assert "allowed: an llm-awq cache" in str(e.value) and "\n" not in str(e.value)


def test_a_float16_run_calibrates_and_quantizes(tmp_path):
    # the authors' default dtype, on the CPU: it used to end in a failed row (a float16 overflow)
    from qeval.tasks import TASKS
    cfg = compose_cfg("model=toy", "device=cpu", "method=awq", "w_bits=4", "dtype=float16", "task=quant_error",
                      f"results_dir={tmp_path}")
    handle, facts = prepare(cfg)
    assert next(handle.model.parameters()).dtype == torch.float16 and facts["linears_quantized"] > 0
    rows = TASKS["quant_error"](handle, cfg.task.quant_error)
    kl = next(r["value"] for r in rows if r["metric"] == "logits_kl")
    assert 0 < kl < float("inf")
