"""Decoder layers kept in full precision (``w_keep_layers``, ``kv_keep_layers``): a kept layer is
exactly the full-precision model's, every other layer is quantized as before, and rows say which."""

from __future__ import annotations

import copy

import torch
from hydra import compose, initialize_config_dir
from method_configs import make_method
from tiny_models import tiny_model
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from qeval.kv.cache import cache_kwarg
from qeval.model.linear import QuantLinear, quantize_linears
from qeval.run import prepare, run
from qeval.validate import CONFIG_DIR

LINEARS_PER_LAYER = 7   # q, k, v, o, gate, up, down


def cfg_of(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=["model=toy", "device=cpu", "task=quant_error",
                                            f"results_dir={tmp_path}", *overrides])


def test_kept_layers_keep_their_linears_and_the_row_counts_them_at_16_bits():
    model, _ = tiny_model("llama")
    original = copy.deepcopy(model)
    facts = quantize_linears(model, make_method("uniform", w_bits=4), "torch", keep=(-1,))
    last = model.model.layers[1]
    assert not any(isinstance(m, QuantLinear) for m in last.modules())
    assert all(torch.equal(a, b) for a, b in zip(last.parameters(), original.model.layers[1].parameters()))
    assert all(isinstance(getattr(model.model.layers[0].self_attn, n), QuantLinear) for n in ("q_proj", "o_proj"))
    assert facts["linears_kept"] == LINEARS_PER_LAYER and facts["linears_quantized"] == LINEARS_PER_LAYER
    # half the Linear weights at 4 bits (+ one fp16 scale per channel), half at 16
    assert 4 < facts["weight_bits_per_element"] < 16


def test_gptq_leaves_a_kept_layer_alone_and_calibrates_the_next_on_its_full_precision_outputs(tmp_path):
    handle, facts = prepare(cfg_of(tmp_path, "method=gptq", "w_bits=4", "w_keep_layers=[0]"))
    plain, _ = prepare(cfg_of(tmp_path / "plain", "method=gptq", "w_bits=4"))
    fresh, _ = prepare(cfg_of(tmp_path / "fp", "w_bits=16"))
    layer = {k: h.model.model.layers for k, h in (("kept", handle), ("plain", plain), ("fp", fresh))}
    assert all(torch.equal(a, b) for a, b in zip(layer["kept"][0].parameters(), layer["fp"][0].parameters()))
    q = layer["kept"][1].mlp.down_proj.weight
    assert not torch.equal(q, layer["fp"][1].mlp.down_proj.weight)          # quantized
    assert not torch.equal(q, layer["plain"][1].mlp.down_proj.weight)       # on other inputs than with layer 0 quantized
    assert facts["linears_kept"] == LINEARS_PER_LAYER


@torch.no_grad()
def test_a_kept_layers_cache_holds_the_full_precision_keys(tmp_path):
    handle, _ = prepare(cfg_of(tmp_path, "method=kivi", "kv_bits=2", "method.group_size=8",
                               "method.residual_length=16", "kv_keep_layers=[0]"))
    ids = torch.randint(3, 400, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = handle.new_cache(torch.ones_like(ids))
    handle.model(input_ids=ids, **{cache_kwarg(handle.model): cache})
    full = DynamicCache(config=handle.model.config)
    handle.model(input_ids=ids, **{cache_kwarg(handle.model): full})
    assert type(cache.layers[0]) is DynamicLayer and torch.equal(cache.layers[0].keys, full.layers[0].keys)
    cache.layers[1].settle()
    assert not torch.equal(cache.layers[1].keys, full.layers[1].keys)      # KIVI quantized its blocks


@torch.no_grad()
def test_simulated_kv_kept_in_every_layer_is_the_full_precision_model(tmp_path):
    ids = torch.randint(3, 400, (1, 24), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name, keep in (("all", "[0,1,2,3]"), ("none", "[]"), ("fp", None)):
        extra = ["kv_bits=16"] if keep is None else ["kv_bits=4", "kv_semantics=simulated", f"kv_keep_layers={keep}"]
        handle, _ = prepare(cfg_of(tmp_path / name, *extra))
        logits[name] = handle.model(input_ids=ids).logits
    assert torch.equal(logits["all"], logits["fp"]) and not torch.equal(logits["none"], logits["fp"])


def test_rows_name_the_kept_layers(tmp_path):
    row = run(cfg_of(tmp_path, "w_bits=4", "w_keep_layers=[0,-1]", "kv_bits=4", "kv_keep_layers=[1]"))["rows"][0]
    assert row["status"] == "ok"
    assert (row["w_keep_layers"], row["kv_keep_layers"], row["linears_kept"]) == ("0,3", "1", 2 * LINEARS_PER_LAYER)
