"""Number formats inside a run: FP8 K/V and weights held as float8 for real (and read back exactly
as the fake-quantized path computes them), the block formats on every target, the rows' format
fields and labels, and one command-line run per storage path."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from method_configs import make_method
from tiny_models import FAMILIES, tiny_model
from transformers import DynamicCache

from qeval.kv.cache import (
    FP8StoredLayer,
    QevalCache,
    StoreQuantizedLayer,
    cache_kwarg,  # noqa: E402
    held_bytes,
    packed_layout_bytes,
)
from qeval.model.linear import FP8WeightLinear, QuantLinear, quantize_linears
from qeval.quant.formats import fp8
from qeval.quant.primitives import relative_error
from qeval.sweep import expand
from qeval.validate import CONFIG_DIR, validate

PROMPTS = ["There and back again. The pass key is 4", "Here we go."]


@pytest.fixture
def wide_heads(monkeypatch):
    """The tiny llama with head_dim 32 (4 heads of 32 on a width of 64), so MX blocks fit a head."""
    monkeypatch.setitem(FAMILIES, "llama", FAMILIES["llama"] | {"head_dim": 32})


def fake_cache_method(method):
    """The same method, but with a cache that holds K/V fake-quantized in the model's dtype."""
    fake = copy.copy(method)
    fake.make_cache_layer = lambda i, seq: StoreQuantizedLayer(fake, seq)
    return fake


def prefill_and_step(model, tok, method):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    cache = QevalCache(method, model.config.num_hidden_layers, enc["attention_mask"])
    mask = torch.cat([enc["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        prefill = model(**enc, **{cache_kwarg(model): cache}).logits
        step = model(input_ids=torch.tensor([[5], [6]]), attention_mask=mask, **{cache_kwarg(model): cache}).logits
    return prefill, step, cache


KV_SETTINGS = [  # (method, knobs, scale columns per token and head)
    ("uniform", {}, 1),
    ("uniform", {"kv_granularity": "per_tensor"}, None),
    ("group", {"kv_group_size": 4}, 4),
]


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("name,knobs,n_scales", KV_SETTINGS)
def test_fp8_cache_holds_float8_and_reads_back_what_fake_quantization_gives(fmt, name, knobs, n_scales):
    model, tok = tiny_model("llama")
    m = make_method(name, kv_format=fmt, **knobs)
    ref_prefill, ref_step, fake = prefill_and_step(model, tok, fake_cache_method(m))
    prefill, step, cache = prefill_and_step(model, tok, m)
    assert all(isinstance(layer, FP8StoredLayer) for layer in cache.layers)
    assert torch.equal(prefill, ref_prefill) and torch.equal(step, ref_step)   # bit for bit
    layer = cache.layers[0]
    assert layer.keys.dtype == layer.values.dtype == fp8.DTYPES[fmt]
    b, h, t, d = layer.keys.shape
    scale_shape = (b, h, t, n_scales) if n_scales else (b, 1, t, 1)
    assert layer.k_scale.shape == layer.v_scale.shape == scale_shape and layer.k_scale.dtype == torch.float32
    assert held_bytes(cache) == sum(x.nbytes for l in cache.layers for x in (l.keys, l.values, l.k_scale, l.v_scale))
    # a quarter of float32 for the codes, plus 4 bytes per scale
    per_element = held_bytes(cache) / held_bytes(fake)
    assert per_element == pytest.approx((d + 4 * (scale_shape[1] * scale_shape[3]) / h) / (4 * d))
    assert packed_layout_bytes(cache, m) == held_bytes(cache)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "mxfp4", "nvfp4"])
def test_a_sequence_alone_and_in_a_padded_batch_decodes_the_same(fmt, wide_heads):
    """Padding stays out of every statistic: per-sequence FP8 excludes it, block formats never
    mix tokens (NVFP4's tensor scale is per token for K/V)."""
    model, tok = tiny_model("llama")
    m = make_method("uniform", kv_format=fmt, kv_granularity="per_tensor")

    def gen(prompts):
        enc = tok(prompts, return_tensors="pt", padding=True)
        out = model.generate(**enc, **{cache_kwarg(model): QevalCache(m, model.config.num_hidden_layers, enc["attention_mask"])},
                             max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        return out[:, enc["input_ids"].shape[1]:]

    assert torch.equal(gen([PROMPTS[1]])[0], gen(PROMPTS)[1])


def test_simulated_fp8_kv_changes_the_prefill_and_cache_semantics_does_not():
    model, tok = tiny_model("llama")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc, **{cache_kwarg(model): DynamicCache(config=model.config)}).logits
    m = make_method("uniform", kv_format="fp8_e5m2", semantics="simulated")
    k = torch.randn(2, 2, 7, 16)
    got_k, _ = m.quantize_kv(k, k)
    assert torch.equal(got_k, fp8.fake_quantize(k, "fp8_e5m2", -1))
    prefill, _, _ = prefill_and_step(model, tok, make_method("uniform", kv_format="fp8_e5m2"))
    assert torch.equal(prefill, ref)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("name,knobs", [("uniform", {}), ("uniform", {"w_granularity": "per_tensor"}),
                                        ("group", {"w_group_size": 32})])
def test_fp8_weights_are_held_as_float8_and_equal_the_fake_quantized_linear(fmt, name, knobs):
    model, tok = tiny_model("llama")
    m = make_method(name, w_format=fmt, a_format=fmt, **knobs)
    stored, fake = copy.deepcopy(model), copy.deepcopy(model)
    facts = quantize_linears(stored, m, "torch")
    fake_m = copy.copy(m)
    fake_m.store_weight = lambda w: None
    quantize_linears(fake, fake_m, "torch")
    layers = [mod for mod in stored.modules() if isinstance(mod, FP8WeightLinear)]
    assert layers and not any(isinstance(mod, QuantLinear) for mod in stored.modules())
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(stored(**enc).logits, fake(**enc).logits)
    assert facts["weight_bytes_held"] == sum(l.weight_codes.numel() + 4 * l.weight_scale.numel() for l in layers)
    assert layers[0].weight_codes.dtype == fp8.DTYPES[fmt]


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
def test_block_formats_quantize_every_target(fmt, wide_heads):
    model, tok = tiny_model("llama")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**enc).logits
        q = copy.deepcopy(model)
        facts = quantize_linears(q, make_method("uniform", w_format=fmt, a_format=fmt), "torch")
        out = q(**enc).logits
    err = relative_error(ref[real], out[real])
    assert 0 < err < 0.5, err
    assert facts["weight_bits_per_element"] == pytest.approx({"mxfp8": 8.25, "mxfp4": 4.25, "nvfp4": 4.5}[fmt], abs=0.01)
    _, step, cache = prefill_and_step(model, tok, make_method("uniform", kv_format=fmt))
    assert type(cache.layers[0]) is StoreQuantizedLayer and torch.isfinite(step).all()


LABELS = [  # (knobs, setting, {target: scale granularity})
    ({"kv_format": "fp8_e4m3"}, "KV fp8_e4m3", {"kv": "per_token fp32"}),
    ({"w_format": "mxfp4"}, "W mxfp4", {"w": "block32 e8m0"}),
    ({"w_format": "nvfp4", "a_format": "nvfp4"}, "W nvfp4 A nvfp4",
     {"w": "block16 e4m3 + tensor fp32", "a": "block16 e4m3 + sequence fp32"}),
    ({"w_bits": 4, "kv_format": "fp8_e5m2"}, "W4 KV fp8_e5m2", {"w": "per_channel", "kv": "per_token fp32"}),
    ({"kv_format": "nvfp4"}, "KV nvfp4", {"kv": "block16 e4m3 + token fp32"}),
    ({"w_bits": 4}, "W4", {"w": "per_channel"}),
    ({"kv_format": "fp8_e4m3", "kv_scale": "static"}, "KV fp8_e4m3", {"kv": "static per_tensor fp32"}),
    ({"kv_format": "fp8_e5m2", "kv_scale": "static_per_head"}, "KV fp8_e5m2", {"kv": "static per_head fp32"}),
]


@pytest.mark.parametrize("knobs,setting,scales", LABELS, ids=[s for _, s, _ in LABELS])
def test_rows_name_the_format_and_where_its_scales_sit(knobs, setting, scales):
    knobs = dict(knobs)
    kv_scale = knobs.pop("kv_scale", "dynamic")   # a run knob, not a method parameter
    m = make_method("uniform", **knobs)
    m.kv.knobs.kv_scale = kv_scale   # one knobs object, shared by the parts
    row = m.describe()
    assert row["kv_scale"] == (kv_scale if knobs.get("kv_format", "int").startswith("fp8") else None)
    assert row["setting"] == setting
    assert {t: row[f"{t}_scale_granularity"] for t in ("w", "a", "kv") if row[f"{t}_scale_granularity"]} == scales
    assert {row["w_format"], row["a_format"], row["kv_format"]} >= {knobs.get(k, "int") for k in ("w_format", "a_format", "kv_format")}
    assert make_method("group", w_bits=4, w_format="int").describe()["w_scale_granularity"] == "group128"
    assert make_method("kivi", kv_bits=2).describe()["kv_scale_granularity"] is None   # its own quantizer


def run_cli(tmp_path, *args) -> list[dict]:
    p = subprocess.run([sys.executable, "-m", "qeval", "model=tiny-random", "task=quant_error",
                        "task.quant_error.n_tokens=48", "task.quant_error.context_tokens=32",
                        f"results_dir={tmp_path}", *args], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    return [json.loads(line) for f in tmp_path.glob("runs/*/rows.jsonl") for line in f.read_text().splitlines()]


def test_command_line_fp8_kv_and_weights_are_held_as_float8(tmp_path):
    row = run_cli(tmp_path, "kv_format=fp8_e4m3", "w_format=fp8_e4m3")[0]
    assert (row["setting"], row["kv_format"], row["w_format"], row["kv_bits"]) == \
        ("W fp8_e4m3 KV fp8_e4m3", "fp8_e4m3", "fp8_e4m3", 8)
    # tiny-random: 2 layers x (K, V) x 2 KV heads x 48 tokens, each token a head's 32 code bytes
    # plus its 4-byte scale (float32 would be 128 bytes: 36 / 128 of it)
    assert row["kv_bytes_held"] == 2 * 2 * 2 * 48 * (32 + 4)
    assert row["weight_bytes_held"] == row["weight_bytes_packed"]   # codes + scales, nothing else
    assert row["w_scale_granularity"] == "per_channel fp32" and row["kv_scale_granularity"] == "per_token fp32"


def test_the_formats_study_and_its_smoke_twin_sweep_the_same_settings_and_every_cell_validates():
    def cells(experiment):
        overrides = expand([f"experiment={experiment}"])
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return [compose("config", overrides=cell) for cell in overrides]

    def grid(cfgs):
        return {(c.method.name, c.w_bits, c.w_format, c.kv_bits, c.kv_format) for c in cfgs}

    smoke = cells("formats_smoke")
    assert grid(cells("formats")) == grid(smoke)
    ints = {("group", b, "int", 16, "int") for b in (8, 4)} | {("group", 16, "int", b, "int") for b in (8, 4)}
    fmts = {("uniform", 16, f, 16, "int") for f in ("fp8_e4m3", "mxfp8", "mxfp4", "nvfp4")}
    fmts |= {("uniform", 16, "int", 16, f) for f in ("fp8_e4m3", "mxfp8", "mxfp4", "nvfp4")}
    assert grid(smoke) == ints | fmts | {("uniform", 16, "int", 16, "int")}
    for cfg in smoke:
        validate(cfg)
