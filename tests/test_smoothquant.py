"""SmoothQuant: smoothing alone leaves the full-precision model's function unchanged (Llama and OPT),
balances activation and weight ranges per channel as its formula intends (alpha = 0.5: equal
maxima), and on planted outlier activation channels W8A8 after smoothing is closer to full precision
than plain per-token W8A8; unsupported architectures are one-line errors; ``symmetric=true`` is the
authors' own fake quantizer bit for bit; the authors' ``act_scales`` file and Qllm-Eval's rep file
(``method.scales_file``) give exactly qeval's own smoothed model, and a file for another model is a
one-line error naming the entry."""

from __future__ import annotations

import re

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from method_configs import make_method
from omegaconf import OmegaConf
from tiny_models import tiny_model
from transformers import AutoConfig

from qeval.calibration import fold
from qeval.calibration.layers import decoder_layers
from qeval.errors import ConfigError
from qeval.methods.smoothquant import SMOOTHQUANT, act_scales, smoothing_scales
from qeval.model.linear import quantize_linears
from qeval.validate import CONFIG_DIR, validate

OUTLIERS = [3, 17, 40]


def samples(n=4, length=24, vocab=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (1, length), generator=g) for _ in range(n)]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_smoothing_leaves_the_full_precision_logits_unchanged(family):
    model, _ = tiny_model(family, dtype=torch.float64)
    ids = torch.cat(samples(2))
    before = logits(model, ids)
    norm = copy.deepcopy(next(m for n, m in model.named_modules() if n.endswith("layers.0." + (
        "input_layernorm" if family == "llama" else "self_attn_layer_norm"))).weight)
    make_method("smoothquant", w_bits=16).transforms[0].calibrate(model, samples())
    after = logits(model, ids)
    changed = next(m for n, m in model.named_modules() if n.endswith("layers.0." + (
        "input_layernorm" if family == "llama" else "self_attn_layer_norm"))).weight
    assert not torch.equal(norm, changed), "the norm was smoothed"
    # each fold rounds a weight twice (w / s, W * s), relative 2**-53 each; however the layers
    # amplify that, it stays far below 1e-9 of the logits, while a wrong fold moves them by O(1)
    scale = before.abs().max()
    assert (after - before).abs().max() <= 1e-9 * scale, float((after - before).abs().max() / scale)


def test_alpha_half_balances_activation_and_weight_maxima_per_channel():
    model, _ = tiny_model("llama", dtype=torch.float64)
    data = samples()
    make_method("smoothquant", w_bits=16, alpha=0.5).transforms[0].calibrate(model, data)
    after = act_scales(model, data)            # the smoothed model's own input maxima
    prefix, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        for g in fold.groups(layer, "llama", norms_only=True):
            w_max = torch.stack([layer.get_submodule(n).weight.abs().amax(0) for n in g.linears]).amax(0)
            x_max = after[f"{prefix}.{i}.{g.linears[0]}"].double()
            # s = sqrt(x_max / w_max) makes x_max / s = w_max * s = sqrt(x_max * w_max)
            assert torch.allclose(x_max, w_max, rtol=1e-6), (i, g.prev)


def planted_outliers(model):
    """Multiply a few channels of every pre-attention and pre-MLP norm by 30 and divide the same
    columns of the Linears they feed: the function is unchanged, their inputs get outliers."""
    _, layers = decoder_layers(model)
    with torch.no_grad():
        for layer in layers:
            for g in fold.groups(layer, "llama", norms_only=True):
                s = torch.ones(layer.get_submodule(g.prev).weight.numel())
                s[OUTLIERS] = 1 / 30
                fold.fold(layer, g, s)
    return model


def kl(fp, q):
    p, lq = fp.log_softmax(-1), q.log_softmax(-1)
    return float((p.exp() * (p - lq)).sum(-1).mean())


def test_w8a8_error_on_outlier_channels_is_lower_after_smoothing():
    fp, _ = tiny_model("llama")
    fp = planted_outliers(fp)
    ids = torch.cat(samples(2, seed=1))
    ref = logits(fp, ids)
    plain, smooth = copy.deepcopy(fp), copy.deepcopy(fp)
    quantize_linears(plain, make_method("uniform", w_bits=8, a_bits=8), "torch")
    sq = make_method("smoothquant", w_bits=8, a_bits=8)
    sq.transforms[0].calibrate(smooth, samples())
    quantize_linears(smooth, sq, "torch")
    kl_plain, kl_smooth = kl(ref, logits(plain, ids)), kl(ref, logits(smooth, ids))
    assert kl_smooth < 0.5 * kl_plain, (kl_smooth, kl_plain)


@pytest.mark.parametrize("family,message", [
    ("gemma", ("model=m: method smoothquant folds scales into the norms of llama, mistral, qwen2, qwen3, opt decoder "
               "layers; this model is gemma")),
])
def test_architectures_it_cannot_fold_into_are_one_line_errors(family, message):
    cfg = OmegaConf.create({"model": {"name": "m"}})
    with pytest.raises(ConfigError) as e:
        SMOOTHQUANT.check_architecture(cfg, AutoConfig.for_model(family))
    assert str(e.value) == message
    with pytest.raises(ConfigError, match="do_layer_norm_before=false"):
        SMOOTHQUANT.check_architecture(cfg, AutoConfig.for_model("opt", do_layer_norm_before=False))


def test_one_calibration_serves_every_alpha_and_bit_width():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        a = compose("config", overrides=["method=smoothquant", "w_bits=8", "a_bits=8"])
        b = compose("config", overrides=["method=smoothquant", "w_bits=4", "a_bits=8", "method.alpha=0.8"])
    assert SMOOTHQUANT.calibration_identity(a) == SMOOTHQUANT.calibration_identity(b)


def fake_quant_absmax(t, n_bits=8):
    """mit-han-lab/smoothquant fake_quant.py quantize_*_per_channel/per_token_absmax."""
    scales = t.abs().max(dim=-1, keepdim=True)[0]
    q_max = 2 ** (n_bits - 1) - 1
    scales.clamp_(min=1e-5).div_(q_max)
    return t.div(scales).round_().mul_(scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_symmetric_is_the_authors_fake_quantizer_bit_for_bit(dtype):
    method = make_method("smoothquant", w_bits=8, a_bits=8, symmetric=True)
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 128, generator=g).to(dtype), torch.randn(2, 7, 128, generator=g).to(dtype)
    assert torch.equal(method.quantize_weight(w), fake_quant_absmax(w))
    assert torch.equal(method.quantize_activation(x), fake_quant_absmax(x.view(-1, 128)).view(x.shape))


# ---------------------------------------------------------------------------- published files
def test_an_act_scales_file_or_a_qllm_eval_rep_file_gives_qevals_own_smoothed_model(tmp_path):
    model, _ = tiny_model("llama")
    fresh, rep_model = copy.deepcopy(model), copy.deepcopy(model)
    method = make_method("smoothquant", w_bits=8, a_bits=8, alpha=0.8)
    result = method.transforms[0].calibrate(model, samples())
    # the authors' act_scales/*.pt: the dict itself (generate_act_scales.py: torch.save(act_scales, path))
    torch.save(dict(result["act_scales"]), tmp_path / "act_scales.pt")
    method.transforms[0].apply_calibration(fresh, SMOOTHQUANT.read_scales_file(tmp_path / "act_scales.pt"))
    # Qllm-Eval's rep file: the smoothing scales themselves in llm-awq's format (apply_rep.py apply_awq)
    prefix, layers = decoder_layers(rep_model)
    rep = {"scale": [], "clip": []}
    for i, layer in enumerate(layers):
        for g in fold.groups(layer, "llama", norms_only=True):
            act = result["act_scales"][f"{prefix}.{i}.{g.linears[0]}"]
            s = smoothing_scales(act, [layer.get_submodule(n).weight for n in g.linears], 0.8)
            rep["scale"].append((f"{prefix}.{i}.{g.prev}", tuple(f"{prefix}.{i}.{n}" for n in g.linears), s))
    torch.save(rep, tmp_path / "rep.pt")
    method.calibrator().apply_calibration(rep_model, method.calibrator().read_scales_file(tmp_path / "rep.pt"))
    ids = torch.cat(samples(2, seed=3))
    out = {}
    for key, m in (("act_scales", fresh), ("rep", rep_model)):
        for (name, a), b in zip(model.state_dict().items(), m.state_dict().values()):
            assert torch.equal(a, b), (key, name)
    for key, m in (("computed", model), ("act_scales", fresh), ("rep", rep_model)):
        quantize_linears(m, method, "torch")
        out[key] = logits(m, ids)
    assert torch.equal(out["computed"], out["act_scales"]) and torch.equal(out["computed"], out["rep"])


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("model.layers.1.mlp.gate_proj"),
     "has no entry model.layers.1.mlp.gate_proj for model LlamaForCausalLM"),
    (lambda d: d.__setitem__("model.layers.0.self_attn.q_proj", torch.ones(32)),
     "entry model.layers.0.self_attn.q_proj has 32 channels; allowed: 64 (the Linear's input width)"),
])
def test_an_act_scales_file_for_another_model_is_one_line_naming_the_entry(tmp_path, edit, message):
    model, _ = tiny_model("llama")
    scales = act_scales(model, samples(1))
    edit(scales)
    torch.save(scales, tmp_path / "a.pt")
    method = make_method("smoothquant", w_bits=8, a_bits=8, scales_file=str(tmp_path / "a.pt"))
    with pytest.raises(ConfigError) as e:
        method.calibrator().apply_calibration(model, method.calibrator().read_scales_file(tmp_path / "a.pt"))
    assert str(e.value).startswith(f"method.scales_file={tmp_path / 'a.pt'}: {message}"), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("entry,message", [
    (torch.ones(2, 2), "is not a 1-D float tensor"),
    # a max |x| per channel is finite and never negative; anything else would smooth to non-finite logits
    (torch.tensor([1.0, float("nan")]), "holds a value that is not a finite number >= 0"),
    (torch.tensor([1.0, float("inf")]), "holds a value that is not a finite number >= 0"),
    (torch.tensor([1.0, -1.0]), "holds a value that is not a finite number >= 0"),
])
def test_an_act_scales_entry_that_is_not_a_vector_of_maxima_is_refused_before_the_model_loads(tmp_path, entry,
                                                                                               message):
    torch.save({"model.layers.0.self_attn.q_proj": entry}, tmp_path / "a.pt")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny-random", "method=smoothquant", "w_bits=8", "a_bits=8",
                                           f"results_dir={tmp_path}", f"method.scales_file={tmp_path / 'a.pt'}"])
    with pytest.raises(ConfigError, match=rf"a.pt: entry model.layers.0.self_attn.q_proj {re.escape(message)}; "
                                          r"allowed: a SmoothQuant act_scales dict"):
        validate(cfg)


def test_a_bfloat16_code_the_reference_rounds_to_128_stays_in_int8():
    # fake_quant.py's quantize_weight_per_channel_absmax has no clamp: in bfloat16, 1.328125 / (its
    # absmax / 127) is 127.25, held as 127.5, which rounds to 128, a code int8 cannot hold (330 of
    # 1.3 M weights on a bf16 Llama); qeval clamps it to 127 and agrees everywhere else
    from qeval.quant.primitives import fake_quantize
    w = torch.tensor([[1.328125, 0.1, -0.7]], dtype=torch.bfloat16)
    scale = w.abs().max(dim=-1, keepdim=True)[0].clamp(min=1e-5) / 127
    reference = (w / scale).round() * scale
    ours = fake_quantize(w, 8, -1, None, symmetric=True, zero_point="integer")
    assert reference[0, 0] == 128 * scale[0, 0] and ours[0, 0] == 127 * scale[0, 0]
    assert torch.equal(reference[0, 1:], ours[0, 1:])
