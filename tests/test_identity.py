"""16 bits on every target is an exact identity: logits equal, greedy tokens identical, including a
left-padded batch, under sdpa and eager."""

import pytest
import torch
from method_configs import from_knobs, method_params
from tiny_models import tiny_model
from transformers import DynamicCache

from qeval.kv import simulated
from qeval.kv.cache import (
    QevalCache,
    cache_kwarg,  # noqa: E402
)
from qeval.methods.base import Bits, Knobs
from qeval.model.linear import QuantLinear, quantize_linears

PROMPTS = ["The pass key is 12345. Remember it.", "Hi"]  # different lengths: left padding


def method16(name="uniform"):
    return from_knobs(name, method_params(name), Knobs(Bits(16, 16, 16, 16), w_group_size=32, kv_group_size=8))


def run(model, tok, cache_factory):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc, **{cache_kwarg(model): cache_factory(enc["attention_mask"])}).logits
        out = model.generate(**enc, **{cache_kwarg(model): cache_factory(enc["attention_mask"])},
                             max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    return logits, out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["uniform", "group"])
def test_kv16_cache_semantics_is_identity(attn, name):
    model, tok = tiny_model("llama", attn)
    ref_logits, ref_out = run(model, tok, lambda m: DynamicCache(config=model.config))
    m16 = method16(name)
    logits, out = run(model, tok, lambda m: QevalCache(m16, model.config.num_hidden_layers, m))
    assert torch.equal(logits, ref_logits)
    assert torch.equal(out, ref_out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_kv16_simulated_semantics_is_identity(attn):
    model, tok = tiny_model("llama", attn)
    ref_logits, ref_out = run(model, tok, lambda m: DynamicCache(config=model.config))
    model.set_attn_implementation(simulated.register(method16(), attn))
    logits, out = run(model, tok, lambda m: DynamicCache(config=model.config))
    assert torch.equal(logits, ref_logits), (logits - ref_logits).abs().max()
    assert torch.equal(out, ref_out)


@pytest.mark.parametrize("name", ["uniform", "group"])
def test_w16_a16_linear_is_identity(name):
    model, tok = tiny_model("llama")
    linear = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, linear.in_features)
    q = QuantLinear(linear, method16(name), quantize_input=True)
    assert torch.equal(q(x), linear(x))
    # at 16 bits nothing is swapped, so the whole model is untouched
    assert quantize_linears(model, method16(name)) == {}
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_every_target_at_16_bits_through_the_runner(tmp_path):
    """The full path (load -> targets -> handle -> passkey rows) at 16 bits equals no quantization."""
    from hydra import compose, initialize_config_dir

    from qeval.run import prepare
    from qeval.validate import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        base = compose("config", overrides=["model=tiny-random", f"results_dir={tmp_path}"])
        sim = compose("config", overrides=["model=tiny-random", "kv_semantics=simulated", f"results_dir={tmp_path}"])
    outs = []
    for cfg in (base, sim):
        handle, facts = prepare(cfg)
        assert facts == {}
        outs.append(handle.generate(PROMPTS, max_new_tokens=8))
    assert outs[0] == outs[1]
