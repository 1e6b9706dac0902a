"""Recipes: parts per slot compose into one run, and a composed run equals its parts' effects run
by hand on the same model and tensors (W from the weight method, A from the act part, K/V from the
KV method, eviction from the evict part)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import DynamicCache

from qeval.calibration import data as calibration_data
from qeval.errors import ConfigError
from qeval.kv.cache import QevalCache, cache_kwarg
from qeval.methods.h2o import H2OLayer
from qeval.model import loading
from qeval.quant.primitives import fake_quantize
from qeval.recipe import slots
from qeval.recipe.build import build_recipe
from qeval.run import prepare
from qeval.validate import CONFIG_DIR

# small KIVI blocks so the toy prompts below cross several of them
KIVI = ["kv.group_size=8", "kv.residual_length=16"]
PROMPT_LEN, DECODE = 40, 6


def cfg_of(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=["model=toy", "device=cpu", "task=quant_error",
                                            f"results_dir={tmp_path}", *overrides])


def ids(seed=3, n=PROMPT_LEN, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 400, (batch, n), generator=g)


@torch.no_grad()
def decode_logits(model, cache, prompt, steps=DECODE) -> torch.Tensor:
    """Prefill then greedy steps through ``cache``: every step's logits, (steps + 1, vocab)."""
    kw = cache_kwarg(model)
    out = model(input_ids=prompt, **{kw: cache})
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        logits.append(model(input_ids=nxt, **{kw: cache}).logits[:, -1])
    return torch.cat(logits)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.state_dict().items()}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def new_cache(method, model, prompt):
    n = model.config.get_text_config().num_hidden_layers
    return QevalCache(method, n, torch.ones_like(prompt))


# ---------------------------------------------------------------------------- the four combinations
def test_gptq_w4_with_a_kivi2_cache_is_gptqs_weights_with_kivis_cache(tmp_path):
    composed, _ = prepare(cfg_of(tmp_path / "a", "weight=gptq", "kv=kivi", "w_bits=4", "kv_bits=2", *KIVI))
    assert composed.method.name == "gptq+kivi"
    # by hand: GPTQ alone (calibrating afresh in its own folder), KIVI alone, on the same model
    gptq, _ = prepare(cfg_of(tmp_path / "b", "method=gptq", "w_bits=4"))
    kivi, _ = prepare(cfg_of(tmp_path / "c", "method=kivi", "kv_bits=2",
                             *[k.replace("kv.", "method.") for k in KIVI]))
    assert_same_weights(composed.model, gptq.model)
    prompt = ids()
    got = decode_logits(composed.model, composed.new_cache(torch.ones_like(prompt)), prompt)
    want = decode_logits(gptq.model, new_cache(kivi.method, gptq.model, prompt), prompt)
    assert torch.equal(got, want)
    # and the KIVI cache changed something: not GPTQ's model with a full-precision cache
    plain = decode_logits(gptq.model, DynamicCache(config=gptq.model.config), prompt)
    assert not torch.equal(got, plain)


def test_smoothquant_then_gptq_w8a8_smooths_then_runs_gptq_on_the_smoothed_model(tmp_path):
    cfg = cfg_of(tmp_path / "a", "transform=[smoothquant]", "weight=gptq", "act=uniform", "w_bits=8", "a_bits=8")
    composed, facts = prepare(cfg)
    assert composed.method.name == "smoothquant+gptq+uniform"
    # by hand on a fresh model: the smoothing, GPTQ on the smoothed model, both on the samples the
    # stage reads (the weight method's preset), then GPTQ's weights and per-token activations
    recipe = build_recipe(cfg)
    (_, sq, sq_view), (_, gptq, _) = recipe.calibrator().steps
    assert sq.spec.name == "smoothquant" and gptq.spec.name == "gptq"
    model, tok = loading.load(cfg.model, "cpu", "float32", "sdpa", 0)
    samples = calibration_data.load_samples(calibration_data.resolve(recipe.calibration_view()), tok)
    sq.calibrate(model, samples)
    gptq.calibrate(model, samples)
    act = recipe.act
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.weight.data = gptq.quantize_weight(module.weight.data)
            hooks.append(module.register_forward_pre_hook(lambda _m, args: (act.quantize_activation(args[0]),)))
    prompt = ids()
    with torch.no_grad():
        assert torch.equal(composed.model(input_ids=prompt).logits, model(input_ids=prompt).logits)
    # GPTQ ran after the smoothing: its saved result is keyed by both parts, never GPTQ's alone
    alone = build_recipe(cfg_of(tmp_path / "a", "method=gptq", "w_bits=8"))
    assert recipe.calibrator().calibration_identity() != alone.calibrator().calibration_identity(alone.cfg)
    assert facts["calibration_reused"] is False and facts["calibration.samples"] == len(samples)


def test_awq_w4_with_a_uniform_kv4_cache_is_awqs_weights_with_uniforms_cache(tmp_path):
    composed, _ = prepare(cfg_of(tmp_path / "a", "weight=awq", "kv=uniform", "w_bits=4", "kv_bits=4"))
    assert composed.method.name == "awq+uniform"
    awq, _ = prepare(cfg_of(tmp_path / "b", "method=awq", "w_bits=4"))
    rtn, _ = prepare(cfg_of(tmp_path / "c", "method=uniform", "kv_bits=4"))
    assert_same_weights(composed.model, awq.model)
    prompt = ids(seed=5)
    got = decode_logits(composed.model, composed.new_cache(torch.ones_like(prompt)), prompt)
    want = decode_logits(awq.model, new_cache(rtn.method, awq.model, prompt), prompt)
    assert torch.equal(got, want)


def kivi_by_hand(theirs, g=8, r=16, bits=2):
    """KIVI on an evicting cache's kept tokens, in position order: keys per channel in groups of G
    in whole blocks of R, values per token in groups of G, all but the newest R."""
    w = theirs.keys.shape[-2]
    k, v = theirs.keys.clone(), theirs.values.clone()
    f = w // r * r
    k[..., :f, :] = fake_quantize(k[..., :f, :], bits, -2, g)
    v[..., :w - r, :] = fake_quantize(v[..., :w - r, :], bits, -1, g)
    return k, v, f


def prefilled(handle, prompt):
    """The handle's cache after a prefill of ``prompt``."""
    cache = handle.new_cache(torch.ones_like(prompt))
    with torch.no_grad():
        handle.model(input_ids=prompt, **{cache_kwarg(handle.model): cache})
    return cache


def evicting_with_kivi_and_alone(tmp_path, policy, knobs, prompt):
    """Prefilled caches of ``evict=<policy> kv=kivi kv_bits=2`` and of the policy alone, same knobs."""
    composed, _ = prepare(cfg_of(tmp_path / "a", f"evict={policy}", "kv=kivi", "kv_bits=2", *KIVI, *knobs))
    assert composed.method.name == f"kivi+{policy}"
    alone, _ = prepare(cfg_of(tmp_path / "b", f"method={policy}", *[k.replace("evict.", "method.") for k in knobs]))
    return composed, prefilled(composed, prompt), prefilled(alone, prompt)


def test_h2o_with_kivi2_keeps_h2os_tokens_and_quantizes_them_as_kivi(tmp_path):
    _, got, alone = evicting_with_kivi_and_alone(tmp_path, "h2o", ["evict.heavy_ratio=0.3", "evict.recent_ratio=0.3"],
                                                 ids(seed=9))
    assert all(isinstance(layer, H2OLayer) for layer in got.layers)
    r = 16
    for mine, theirs in zip(got.layers, alone.layers):
        # the prefill attends in full precision, so H2O keeps the same tokens in the same slots
        assert torch.equal(mine.pos, theirs.pos)
        w = theirs.keys.shape[-2]                     # 24 kept: 12 heavy + 12 recent, in position order
        k, v, f = kivi_by_hand(theirs)
        assert torch.equal(mine.keys, k) and torch.equal(mine.values, v)
        assert int(mine.raw_keys.sum()) == mine.raw_keys[..., 0].numel() * (w - f)
        assert int(mine.raw_values.sum()) == mine.raw_values[..., 0].numel() * r
        # bytes: the quantized part by KIVI's formula, the rest fp16, less than H2O's fp16 cache
        assert mine.packed_bytes() < theirs.packed_bytes()


def test_h2o_with_kivi2_decodes_with_the_budget_held_and_every_aged_token_quantized(tmp_path):
    composed, _ = prepare(cfg_of(tmp_path, "evict=h2o", "kv=kivi", "kv_bits=2", *KIVI,
                                 "evict.heavy_ratio=0.3", "evict.recent_ratio=0.3"))
    prompt = ids(seed=11)
    cache = composed.new_cache(torch.ones_like(prompt))
    logits = decode_logits(composed.model, cache, prompt, steps=20)
    assert torch.isfinite(logits).all()
    for layer in cache.layers:
        kept = layer.kept()
        assert int(kept[0, 0].sum()) == 24                    # the budget: 12 heavy + 12 recent
        # KIVI's residual bound holds per head: fewer than R keys and at most R values unquantized
        assert int((layer.raw_keys & kept).sum(-1).max()) < 16
        assert int((layer.raw_values & kept).sum(-1).max()) <= 16


def test_streaming_with_kivi2_keeps_the_sinks_and_window_and_quantizes_them_as_kivi(tmp_path):
    prompt = ids(seed=17)
    composed, *caches = evicting_with_kivi_and_alone(tmp_path, "streaming", ["evict.n_sink=4", "evict.recent_budget=20"],
                                                     prompt)
    for mine, theirs in zip(*(c.layers for c in caches)):
        mine.settle()                          # what the next step would quantize first
        assert theirs.keys.shape[-2] == 24     # 4 sinks + 20 recent, in position order
        k, v, _ = kivi_by_hand(theirs)
        assert torch.equal(mine.keys, k) and torch.equal(mine.values, v)
        assert mine.packed_bytes() < theirs.packed_bytes()
    logits = decode_logits(composed.model, composed.new_cache(torch.ones_like(prompt)), prompt, steps=20)
    assert torch.isfinite(logits).all()


def test_a_shorthand_and_its_one_part_recipe_compute_the_same(tmp_path):
    # method=kivi is kv=kivi with the default method filling nothing it quantizes
    short, _ = prepare(cfg_of(tmp_path / "a", "method=kivi", "kv_bits=2",
                              *[k.replace("kv.", "method.") for k in KIVI]))
    part, _ = prepare(cfg_of(tmp_path / "b", "kv=kivi", "kv_bits=2", *KIVI))
    assert short.method.name == part.method.name == "kivi"
    prompt = ids(seed=13)
    assert torch.equal(decode_logits(short.model, short.new_cache(torch.ones_like(prompt)), prompt),
                       decode_logits(part.model, part.new_cache(torch.ones_like(prompt)), prompt))


# ---------------------------------------------------------------------------- config and rows
def test_parts_fill_slots_and_a_method_fills_what_is_left(tmp_path):
    def chosen(*o):
        return [(p.key, p.name, p.slots) for p in slots.parts(cfg_of(tmp_path, *o))]

    assert chosen("method=kivi") == [("method", "kivi", ("kv",))]
    assert chosen("method=gptq", "kv=kivi") == [("method", "gptq", ("weight",)), ("kv", "kivi", ("kv",))]
    assert chosen("method=smoothquant", "weight=gptq") == [("method", "smoothquant", ("transform", "act")),
                                                          ("weight", "gptq", ("weight",))]
    assert chosen("transform=[smoothquant]", "weight=gptq") == [
        ("transform.smoothquant", "smoothquant", ("transform",)), ("weight", "gptq", ("weight",)),
        ("method", "uniform", ("act", "kv"))]


def test_a_part_reads_only_its_own_bits(tmp_path):
    cfg = cfg_of(tmp_path, "weight=awq", "kv=kivi", "w_bits=4", "kv_bits=2", "kv_format=int")
    views = {p.key: p.view(cfg) for p in slots.parts(cfg)}
    assert (views["weight"].w_bits, views["weight"].kv_bits) == (4, 16)
    assert (views["kv"].w_bits, views["kv"].kv_bits) == (16, 2)
    assert views["kv"].method.name == "kivi" and views["weight"].method.name == "awq"


def test_rows_name_every_part_and_its_knobs(tmp_path):
    from qeval.run import run
    result = run(cfg_of(tmp_path, "weight=gptq", "kv=kivi", "w_bits=4", "kv_bits=2", *KIVI, "weight.damp=0.02"))
    row = result["rows"][0]
    assert row["method"] == "gptq+kivi" and row["status"] == "ok"
    assert (row["weight_method"], row["act_method"], row["kv_method"], row["evict_method"], row["transforms"]) \
        == ("gptq", None, "kivi", None, None)
    assert row["weight.damp"] == 0.02 and row["kv.group_size"] == 8 and row["kv.residual_length"] == 16
    # the default method fills no slot at work here: its knobs name nothing this run did
    assert not any(k.startswith("method.") for k in row)
    assert row["w_scale_granularity"] == "group128" and row["kv_backend"] == "torch"
    assert (row["target"], row["setting"]) == ("mixed", "W4A16K2V2")


def test_the_zero_point_column_is_the_first_quantizing_parts(tmp_path):
    """A transform quantizes nothing: the row's ``zero_point`` is the weight part's (GPTQ's own
    grid), and the act part's convention is its knob."""
    row = build_recipe(cfg_of(tmp_path, "transform=[smoothquant]", "weight=gptq", "act=uniform", "w_bits=8",
                              "a_bits=8", "act.zero_point=real")).describe()
    assert row["zero_point"] == "gptq" and row["act.zero_point"] == "real"
    assert row["w_scale_granularity"] == "group128" and row["a_scale_granularity"] == "per_token"


def test_the_new_syntax_runs_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qeval", "model=toy", "weight=gptq", "kv=kivi", "w_bits=4",
                          "kv_bits=2", "task=passkey", "task.passkey.samples_per_cell=1", f"results_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (result,) = list((tmp_path / "runs").glob("*/result.json"))
    rows = json.loads(result.read_text())["rows"]
    assert {r["method"] for r in rows} == {"gptq+kivi"} and all(r["status"] == "ok" for r in rows)


@pytest.mark.parametrize("overrides", [["evict=h2o", "kv=kivi", "kv_bits=2"], ["method=h2o", "kv=uniform", "kv_bits=4"],
                                       ["evict=streaming", "kv=group", "kv_bits=4"]])
def test_eviction_and_quantization_build_one_cache(tmp_path, overrides):
    recipe = build_recipe(cfg_of(tmp_path, *overrides))
    assert recipe.evict.aging is not None and recipe.needs_cache


def test_every_part_option_is_a_method_serving_that_slot_and_every_method_has_a_line():
    from qeval.methods import METHODS
    from qeval.schema import options
    assert all(isinstance(c.slots, tuple) and c.slots for c in METHODS.values())   # each declares its slots
    for slot in slots.SLOTS:
        for name in options(slot):
            assert slot in slots.serves(name), (slot, name)
            # the option reuses the method's own YAML: its knobs are written once
            text = (CONFIG_DIR / slot / f"{name}.yaml").read_text()
            assert f"/method@_here_: {name}" in text


def test_a_recipe_built_without_validation_still_refuses_an_evicting_cache_it_cannot_quantize(tmp_path):
    """GEAR's blocks span tokens eviction drops: validation refuses the pair before load, and a
    recipe built directly (scripts, tests) refuses it too rather than hand the cache a reason
    where its quantization rules belong."""
    with pytest.raises(ConfigError, match=r"^kv=gear: with evict=h2o: it compresses streaming blocks"):
        build_recipe(cfg_of(tmp_path, "evict=h2o", "kv=gear", "kv_bits=2"))
