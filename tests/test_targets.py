"""W, WA and KV on tiny random models of seven families: each target really changes the model,
more bits change it less, and KV semantics differ exactly where they should."""

import copy

import pytest
import torch
from method_configs import from_knobs, method_params
from omegaconf import OmegaConf
from tiny_models import FAMILIES, OWN_ATTENTION, runs_registered_attention, tiny_model
from transformers import DynamicCache

from qeval.errors import ConfigError
from qeval.kv import simulated
from qeval.kv.cache import (
    QevalCache,
    cache_kwarg,  # noqa: E402
    held_bytes,
    packed_layout_bytes,
)
from qeval.methods.base import Bits, Knobs
from qeval.model.linear import QuantLinear, quantize_linears
from qeval.quant.primitives import relative_error

PROMPTS = ["There and back again. The pass key is 4", "Here we go."]
CFG = method_params("uniform")


def method(w=16, a=16, kv=16):
    return from_knobs("uniform", CFG, Knobs(Bits(w, a, kv, kv)))


def logits_of(model, tok, cache=None):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        c = cache(enc["attention_mask"]) if cache else DynamicCache(config=model.config)
        return model(**enc, **{cache_kwarg(model): c}).logits, enc


@pytest.mark.parametrize("family", list(FAMILIES))
def test_weight_and_activation_targets(family):
    model, tok = tiny_model(family)
    ref, enc = logits_of(model, tok)
    real = enc["attention_mask"].bool()
    errors = {}
    for w in (2, 4, 8):
        q = copy.deepcopy(model)
        facts = quantize_linears(q, method(w=w))
        assert facts["linears_quantized"] > 0
        # the LM head is kept in full precision
        assert not isinstance(q.get_output_embeddings(), QuantLinear)
        errors[w] = relative_error(ref[real], logits_of(q, tok)[0][real])
    assert errors[2] > errors[4] > errors[8] > 0, errors
    wa = copy.deepcopy(model)
    quantize_linears(wa, method(w=8, a=4))
    out = logits_of(wa, tok)[0]
    assert torch.isfinite(out).all()
    assert relative_error(ref[real], out[real]) > errors[8]  # 4-bit inputs cost more than W8 alone


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_semantics(family):
    """``cache``: prefill attends in full precision (logits equal) and only later steps read the
    quantized cache. ``simulated``: the prefill itself changes."""
    model, tok = tiny_model(family)
    ref, enc = logits_of(model, tok)
    m4 = method(kv=4)
    n_layers = model.config.get_text_config().num_hidden_layers
    cached = {}
    out, _ = logits_of(model, tok, lambda mask: cached.setdefault("c", QevalCache(m4, n_layers, mask)))
    assert torch.equal(out, ref)
    cache = cached["c"]
    step = torch.tensor([[5], [6]])
    mask = torch.cat([enc["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    ref_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**enc, **{cache_kwarg(model): ref_cache})
        dec_ref = model(input_ids=step, attention_mask=mask, **{cache_kwarg(model): ref_cache}).logits
        dec_q = model(input_ids=step, attention_mask=mask, **{cache_kwarg(model): cache}).logits
    assert not torch.equal(dec_q, dec_ref)
    assert relative_error(dec_ref, dec_q) < 0.5
    # bytes: measured from the held tensors; the packed figure is smaller at 4 bits
    assert held_bytes(cache) == sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)
    assert 0 < packed_layout_bytes(cache, m4) < held_bytes(cache) / 4

    sim = copy.deepcopy(model)
    # whether attention runs registered functions is the model's own behaviour (Falcon's changed
    # in transformers 5.25); where it does not, simulated must refuse rather than measure fp
    if not runs_registered_attention(copy.deepcopy(model)):
        with pytest.raises(ConfigError, match="kv_semantics=simulated"):
            simulated.install(sim, m4, "sdpa")
        return
    simulated.install(sim, m4, "sdpa")
    out_sim, _ = logits_of(sim, tok)
    real = enc["attention_mask"].bool()
    assert not torch.equal(out_sim[real], ref[real])
    assert relative_error(ref[real], out_sim[real]) < 0.5


@pytest.mark.parametrize("family", list(FAMILIES) + list(OWN_ATTENTION))
def test_attention_route_probe_agrees_with_a_real_forward(family):
    """qeval's pre-load probe (the architecture on the meta device) gives the answer a real forward
    of the loaded model gives, for families that route through AttentionInterface and those that
    do not."""
    from qeval.kv.attention import routes_registered_attention
    model, _ = tiny_model(family)
    truth = runs_registered_attention(model)
    assert routes_registered_attention(model.config) is truth
    if family in OWN_ATTENTION:
        assert truth is False


@pytest.mark.parametrize("family", list(FAMILIES) + list(OWN_ATTENTION))
def test_attention_route_fallback_agrees_with_a_real_forward(family, monkeypatch):
    """Where the meta-device run fails (older transformers), the modeling module is read instead,
    and it gives the same answer."""
    from qeval.kv import attention

    def cannot_run(arch_config):
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    monkeypatch.setattr(attention, "_count_probe_calls", cannot_run)
    monkeypatch.setattr(attention, "_routes", {})
    model, _ = tiny_model(family)
    assert attention.routes_registered_attention(model.config) is runs_registered_attention(model)


def test_simulated_is_refused_where_attention_ignores_registered_functions():
    model, _ = tiny_model(next(iter(OWN_ATTENTION)))
    with pytest.raises(ConfigError, match="kv_semantics=simulated: .* does not route attention"):
        simulated.install(model, method(kv=4), "sdpa")


def test_left_padding_does_not_change_a_sequence():
    """A sequence alone and inside a left-padded batch gives the same greedy tokens under every KV
    granularity, because padding is kept out of the statistics."""
    model, tok = tiny_model("llama")
    for gran in ("per_token", "per_tensor"):
        cfg = OmegaConf.merge(CFG, {"kv_granularity": gran})
        m = from_knobs("uniform", cfg, Knobs(Bits(16, 16, 3, 3)))
        n = model.config.num_hidden_layers

        def gen(prompts):
            enc = tok(prompts, return_tensors="pt", padding=True)
            out = model.generate(**enc, **{cache_kwarg(model): QevalCache(m, n, enc["attention_mask"])},
                                 max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
            return out[:, enc["input_ids"].shape[1]:]

        alone = gen([PROMPTS[1]])
        batched = gen(PROMPTS)
        assert torch.equal(alone[0], batched[1]), gran


def test_fused_expert_weights_refuse_w_and_wa_and_leave_kv_alone():
    # transformers 5 holds a MoE's experts as (E, 2I, H) tensors, outside any nn.Linear: a W4 row
    # would quantize only the attention and call the model W4
    from transformers import AutoConfig, AutoModelForCausalLM

    from qeval.model.linear import fused_weights, refuse_fused_weights
    cfg = AutoConfig.for_model("mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                               num_local_experts=4, num_experts_per_tok=2)
    moe = AutoModelForCausalLM.from_config(cfg)
    assert [n for n, _ in fused_weights(moe)] == ["model.layers.0.mlp.experts.gate_up_proj",
                                                  "model.layers.0.mlp.experts.down_proj"]
    for w, a in ((4, 16), (16, 8)):
        with pytest.raises(ConfigError, match="holds weights outside nn.Linear"):
            refuse_fused_weights(moe, method(w=w, a=a), "tiny-moe")
    refuse_fused_weights(moe, method(kv=4), "tiny-moe")          # K/V are not in the experts
    assert fused_weights(tiny_model("llama")[0]) == []

