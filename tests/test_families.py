"""Today's model families through every method, on the run's own path (``qeval.run.prepare``:
validation, load, calibration, the Linear swap, the cache): each (family, method) either runs and
generates finite logits through the method's cache, or is refused before the model loads with one
line saying why. The families are tiny random models built from each family's config: Llama-3.1
with its rope scaling, Qwen2.5 (qwen2), Qwen3 (q/k norms), Gemma-2 (soft-capping, eager only) and
Gemma-3 (hybrid sliding/global layers), Mistral-7B-v0.1's sliding window, and the mixtures of
experts Mixtral and Qwen3-MoE (fused expert tensors)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from qeval.errors import ConfigError
from qeval.run import prepare
from qeval.validate import CONFIG_DIR, validate

RC = "model.random_config"
FAMILIES = {
    "llama3.1": [f"+{RC}.rope_parameters={{rope_type: llama3, rope_theta: 500000.0, factor: 8.0, "
                 "low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 32}"],
    "qwen2.5": [f"{RC}.model_type=qwen2"],
    "qwen3": [f"{RC}.model_type=qwen3", f"+{RC}.head_dim=32"],
    "mistral": [f"{RC}.model_type=mistral", f"+{RC}.sliding_window=16"],
    "gemma2": [f"{RC}.model_type=gemma2", f"+{RC}.head_dim=32", f"+{RC}.sliding_window=16", "attn=eager"],
    "gemma3": [f"{RC}.model_type=gemma3_text", f"+{RC}.head_dim=32", f"+{RC}.sliding_window=16"],
    "mixtral": [f"{RC}.model_type=mixtral", f"+{RC}.num_local_experts=4"],
    "qwen3_moe": [f"{RC}.model_type=qwen3_moe", f"+{RC}.head_dim=32", f"+{RC}.num_experts=4", f"+{RC}.num_experts_per_tok=2",
                  f"+{RC}.moe_intermediate_size=64"],
}
# each method at bits that put it to work, with small groups and blocks for 40-token prompts
METHODS = {
    "uniform": ["method=uniform", "w_bits=4", "a_bits=8", "kv_bits=4"],
    "group": ["method=group", "w_bits=4", "w_group_size=32", "kv_bits=4", "kv_group_size=16"],
    "gptq": ["method=gptq", "w_bits=4", "w_group_size=32"],
    "awq": ["method=awq", "w_bits=4", "w_group_size=32"],
    "smoothquant": ["method=smoothquant", "w_bits=8", "a_bits=8"],
    "kivi": ["method=kivi", "kv_bits=2", "method.group_size=16", "method.residual_length=16"],
    "gear": ["method=gear", "kv_bits=2", "method.group_size=16", "method.stream_block=16"],
    "h2o": ["method=h2o", "method.heavy_ratio=0.2", "method.recent_ratio=0.2"],
    "streaming": ["method=streaming", "method.n_sink=2", "method.recent_ratio=0.2"],
}
WEIGHTS = ("uniform", "group", "gptq", "awq", "smoothquant")
FOLDS = ("awq", "smoothquant")            # scales folded into the norms (qeval.calibration.fold)
EVICTS = ("h2o", "streaming")
SLIDING = ("mistral", "gemma2", "gemma3")
MOE = ("mixtral", "qwen3_moe")


def refusal(family: str, method: str) -> str | None:
    """What the one-line refusal of (family, method) names, or None: it runs."""
    if (family.startswith("gemma") or family in MOE) and method in FOLDS:
        return "folds scales into the norms"
    if family in MOE and method in WEIGHTS:
        return "fused expert tensor"       # the Linear swap cannot reach the experts
    if family in SLIDING and method in EVICTS:
        return "has sliding-window layers"
    return None


def cfg_of(tmp_path, family, method):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[
            "model=tiny-random", "device=cpu", "task=quant_error", f"results_dir={tmp_path}",
            "calibration=toy", "calibration.n_samples=2", "calibration.seq_len=64",
            *FAMILIES[family], *METHODS[method]])


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_runs_on_every_family_or_is_refused_in_one_line(tmp_path, family, method):
    cfg = cfg_of(tmp_path, family, method)
    want = refusal(family, method)
    if want is not None:
        with pytest.raises(ConfigError) as e:
            validate(cfg)
        assert want in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not (tmp_path / "calibration").exists()    # refused before any calibration ran
        return
    validate(cfg)
    handle, facts = prepare(cfg)
    if method in WEIGHTS:
        assert facts["linears_quantized"] > 0
    prompts = ["The pass key is 4217. Remember it, then go on and on: 4217.", "Go on:"]
    enc = handle.tokenizer(prompts, return_tensors="pt", padding=True)
    cache = handle.new_cache(enc["attention_mask"])
    with torch.no_grad():
        out = handle.model.generate(**enc, past_key_values=cache, max_new_tokens=20, do_sample=False,
                                    output_scores=True, return_dict_in_generate=True,
                                    pad_token_id=handle.tokenizer.pad_token_id)
    assert torch.isfinite(torch.stack(out.scores)).all()
    if method not in WEIGHTS:   # a KV method's own cache held the K/V, past the sliding window too
        assert type(cache).__name__ == "QevalCache" and cache.get_seq_length() > 16


@pytest.mark.parametrize("family", SLIDING)
def test_a_qeval_cache_keeps_each_sliding_layers_window(tmp_path, family):
    """Past the window (16) the model's own mask still applies it through qeval's caches: a KV
    method at 16 bits generates what transformers' cache gives, which holds only the window in a
    sliding layer, so the two differ only in summation order (tests/tolerances.py)."""
    from transformers import DynamicCache

    from method_configs import make_method
    from qeval.kv.cache import QevalCache
    from qeval.model import loading
    from tolerances import network_rounding
    cfg = cfg_of(tmp_path, family, "uniform")
    model, tok = loading.load(cfg.model, "cpu", "float32", cfg.attn, 0)
    enc = tok(["The pass key is 4217. Remember it, then go on and on: 4217.", "Go on:"], return_tensors="pt",
              padding=True)

    def generate(cache):
        with torch.no_grad():
            return model.generate(**enc, past_key_values=cache, max_new_tokens=24, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    ref = generate(DynamicCache(config=model.config))
    n = model.config.get_text_config().num_hidden_layers
    ours = generate(QevalCache(make_method("uniform", 16), n, enc["attention_mask"]))
    assert enc["input_ids"].shape[1] + 24 > 2 * 16     # every sliding layer drops tokens
    assert torch.equal(ours.sequences, ref.sequences)
    a, b = torch.stack(ref.scores), torch.stack(ours.scores)
    assert (a - b).abs().max().item() <= network_rounding(model.config, a.abs().max().item())
