"""Static FP8 K/V scales (``kv_scale=static``): the scale is amax / max of the K/V the calibration
data really produces (measured here by hooks on k_proj / v_proj and RoPE applied by hand), the cache
holds float8 codes made with that fixed scale and saturating beyond it, a second run reuses the
saved amax, and one float32 per layer and tensor leaves the bytes at half of fp16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from method_configs import make_method
from tiny_models import tiny_model
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from qeval.calibration import kv_scales
from qeval.calibration.kv_scales import Calibration, KVScales
from qeval.kv.cache import QevalCache, StaticFP8Layer, cache_kwarg, held_bytes
from qeval.quant.formats import fp8
from qeval.run import run
from qeval.validate import CONFIG_DIR

PROMPTS = ["There and back again. The pass key is 4", "Here we go."]


def samples(tok):
    return [tok(t, return_tensors="pt").input_ids for t in ("The pass key is 71. Remember it.", "abc " * 9)]


def hooked_amax(model, ids_list) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_layers, kv_heads) amax of post-RoPE K and of V, from k_proj / v_proj outputs with
    RoPE applied here, independently of any cache."""
    text = model.config
    heads = text.num_key_value_heads
    d = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    seen = {}
    hooks = [mod.register_forward_hook(lambda m, i, o, key=(n, p): seen.__setitem__(key, o))
             for n, layer in enumerate(model.model.layers)
             for p, mod in (("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj))]
    k_amax = torch.zeros(len(model.model.layers), heads)
    v_amax = torch.zeros_like(k_amax)
    with torch.no_grad():
        for ids in ids_list:
            model(input_ids=ids)
            pos = torch.arange(ids.shape[1])[None]
            cos, sin = model.model.rotary_emb(seen[(0, "k")], pos)
            for n in range(len(model.model.layers)):
                # (1, T, H * D) -> (1, H, T, D)
                k, v = (seen[(n, p)].view(1, -1, heads, d).transpose(1, 2) for p in ("k", "v"))
                _, k = apply_rotary_pos_emb(k, k, cos, sin)
                k_amax[n] = torch.maximum(k_amax[n], k.abs().amax(dim=(0, 2, 3)))
                v_amax[n] = torch.maximum(v_amax[n], v.abs().amax(dim=(0, 2, 3)))
    for h in hooks:
        h.remove()
    return k_amax, v_amax


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_the_static_scale_is_amax_over_max_of_the_kv_the_calibration_data_produces(fmt):
    model, tok = tiny_model("llama")
    k_amax, v_amax = hooked_amax(model, samples(tok))
    m = make_method("uniform", kv_format=fmt)
    result = Calibration(m.kv, "static").calibrate(model, samples(tok))
    # the same float32 operations on the same inputs: equal bit for bit
    assert torch.equal(result["k_amax"], k_amax) and torch.equal(result["v_amax"], v_amax)
    top = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}[fmt]
    assert torch.equal(m.kv_scales.k, k_amax.amax(-1, keepdim=True) / top)
    assert torch.equal(m.kv_scales.v, v_amax.amax(-1, keepdim=True) / top)
    per_head = KVScales.from_amax(result["k_amax"], result["v_amax"], fmt, "static_per_head")
    assert torch.equal(per_head.k, k_amax / top) and per_head.k.shape == (2, 2)


def static_cache_run(model, tok, method):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    cache = QevalCache(method, model.config.num_hidden_layers, enc["attention_mask"])
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**enc, **{cache_kwarg(model): cache})
        model(**enc, **{cache_kwarg(model): ref})
    return cache, ref


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("kind", ["static", "static_per_head"])
def test_a_static_cache_holds_float8_made_with_the_fixed_scale_and_saturates_beyond_it(fmt, kind):
    model, tok = tiny_model("llama")
    m = make_method("uniform", kv_format=fmt)
    k_amax, v_amax = hooked_amax(model, samples(tok))
    # half the calibration amax, so the prompts' largest K/V lie beyond it and must saturate
    m.kv.kv_scales = KVScales.from_amax(k_amax / 2, v_amax / 2, fmt, kind)
    cache, ref = static_cache_run(model, tok, m)
    top = fp8.MAX[fmt]
    for i, (layer, want) in enumerate(zip(cache.layers, ref.layers)):
        assert type(layer) is StaticFP8Layer and layer.keys.dtype == layer.values.dtype == fp8.DTYPES[fmt]
        k_scale, v_scale = m.kv_scales.layer(i)
        assert torch.equal(layer.k_scale, k_scale) and torch.equal(layer.v_scale, v_scale)
        for codes, scale, x in ((layer.keys, k_scale, want.keys), (layer.values, v_scale, want.values)):
            expected = (x / scale).clamp(-top, top).to(fp8.DTYPES[fmt]).float() * scale
            got = fp8.decode(codes, scale, torch.float32)
            assert torch.equal(got, expected)
            beyond = x.abs() > top * scale
            assert beyond.any(), "the test must reach saturation"
            assert torch.equal(got[beyond].abs(), (top * scale).expand_as(x)[beyond])


def test_simulated_static_quantization_is_per_layer_and_equals_the_caches_codes():
    model, tok = tiny_model("llama")
    m = make_method("uniform", kv_format="fp8_e4m3", semantics="simulated")
    Calibration(m.kv, "static").calibrate(model, samples(tok))
    k = torch.randn(2, 2, 7, 16) * 3
    got0, _ = m.quantize_kv(k, k, None, layer_idx=0)
    got1, _ = m.quantize_kv(k, k, None, layer_idx=1)
    s0, s1 = m.kv_scales.layer(0)[0], m.kv_scales.layer(1)[0]
    assert torch.equal(got0, fp8.decode(fp8.encode(k, s0, "fp8_e4m3"), s0, k.dtype))
    assert not torch.equal(s0, s1) and not torch.equal(got0, got1)
    with pytest.raises(ValueError, match="per layer"):
        m.quantize_kv(k, k)


def test_one_scale_per_layer_and_tensor_leaves_the_bytes_at_half_of_fp16():
    model, tok = tiny_model("llama")
    m = make_method("uniform", kv_format="fp8_e4m3")
    Calibration(m.kv, "static").calibrate(model, samples(tok))
    cache, ref = static_cache_run(model, tok, m)
    n = sum(l.keys.numel() + l.values.numel() for l in ref.layers)
    # one byte per element plus one float32 for K and one for V per layer
    assert held_bytes(cache) == n + 2 * 4 * model.config.num_hidden_layers
    assert held_bytes(cache) / (2 * n) == pytest.approx(0.5, abs=1e-3)   # vs fp16: 8 bytes in ~10^4


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def rows_of(result) -> list[dict]:
    return [json.loads(line) for line in (Path(result["run_dir"]) / "rows.jsonl").read_text().splitlines()]


def test_a_second_run_reuses_the_saved_amax_for_either_format_and_semantics(tmp_path):
    common = ["model=toy", "device=cpu", "kv_scale=static", "calibration.n_samples=8", f"results_dir={tmp_path}"]
    quant_error = ["task=quant_error", "task.quant_error.n_tokens=64", "task.quant_error.context_tokens=48"]
    first = rows_of(run(compose_cfg(*common, *quant_error, "kv_format=fp8_e4m3")))
    again = rows_of(run(compose_cfg(*common, *quant_error, "kv_format=fp8_e4m3", "force=true")))
    # the other format under simulated semantics (its own attention function) reuses the same amax
    other = rows_of(run(compose_cfg(*common, "kv_format=fp8_e5m2", "kv_semantics=simulated", "task=toy_arith",
                                    "task.toy_arith.n_samples=4")))
    assert [r["kv_calibration_reused"] for r in (first[0], again[0], other[0])] == [False, True, True]
    assert first[0]["kv_calibration.hash"] == again[0]["kv_calibration.hash"] == other[0]["kv_calibration.hash"]
    assert first[0]["kv_calibration.preset"] == "toy" and first[0]["kv_calibration.samples"] == 8
    assert [(r["metric"], r["value"]) for r in again] == [(r["metric"], r["value"]) for r in first]
    assert (first[0]["kv_scale"], first[0]["kv_scale_granularity"]) == ("static", "static per_tensor fp32")
    assert (other[0]["kv_semantics"], other[0]["kv_scale_granularity"]) == ("simulated", "static per_tensor fp32")
    assert all(r["status"] == "ok" for r in first + other)


def test_auto_calibration_for_kv_scales_falls_back_to_a_preset_where_the_method_names_none():
    cfg = kv_scales.data_config(compose_cfg("model=tiny-random", "kv_scale=static", "kv_format=fp8_e4m3"))
    assert cfg.method.calibration == kv_scales.DEFAULT_PRESET
    gptq = kv_scales.data_config(compose_cfg("model=tiny-random", "method=gptq", "kv_scale=static"))
    assert gptq.method.calibration == "gptq_c4"
