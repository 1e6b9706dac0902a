"""What every packed-KV backend test needs: the tiny model, greedy generation of a left-padded
batch through a method's cache, and the checks that hold for any method with ``backend=triton``
(it runs the fused decode, equals ``backend=torch``, and keeps its rows intact under beams and
batch row operations)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

from omegaconf import OmegaConf  # noqa: E402

from qeval import models  # noqa: E402
from qeval.handle import Handle  # noqa: E402
from qeval.kv_cache import held_bytes  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# mixed lengths: left padding, rows that compress blocks at different steps
PROMPTS = ["the passkey is 4721. what is it?", "hello there"]


def load_tiny(dtype: str = "float32"):
    cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs", "model", "tiny-random.yaml"))
    return models.load(cfg, DEV, dtype, "sdpa", 0)


def generate(model, tok, method, n_new=18, prompts=PROMPTS, **gen):
    """Greedy tokens and per-step logits of the left-padded ``prompts``, through the method's
    cache: (sequences, logits, cache, stats)."""
    attn = method.attention_implementation("sdpa")
    model.set_attn_implementation(attn or "sdpa")
    handle = Handle(model, tok, method, "cache")
    enc = tok(prompts, return_tensors="pt", padding=True).to(DEV)
    cache = handle.new_cache(enc["attention_mask"])
    out = model.generate(**enc, past_key_values=cache, max_new_tokens=n_new, do_sample=False,
                         pad_token_id=tok.pad_token_id, return_dict_in_generate=True,
                         output_logits=True, **gen)
    model.set_attn_implementation("sdpa")
    handle.stats.observe_cache(cache, method)
    return out.sequences, torch.stack(out.logits), cache, handle.stats


def check_triton_equals_torch(model, tok, make, layer_cls, monkeypatch, n_new=18):
    """``make(backend, k_bits=None, v_bits=None)`` builds the method. With ``backend=triton``
    every decode step of every layer runs the fused path, the greedy tokens equal torch's, the
    logits agree to float rounding while quantization itself moves them far more (so the
    comparison has teeth even where the text does not change), both backends report the same
    packed-layout figure, and the packed cache holds less. Returns the triton cache."""
    ref, ref_logits, ref_cache, ref_stats = generate(model, tok, make("torch"), n_new)
    fused_steps = []
    decode = layer_cls.decode
    monkeypatch.setattr(layer_cls, "decode", lambda self, *a: fused_steps.append(1) or decode(self, *a))
    out, logits, cache, stats = generate(model, tok, make("triton"), n_new)
    assert all(isinstance(layer, layer_cls) for layer in cache.layers)
    assert len(fused_steps) == len(cache.layers) * (n_new - 1), len(fused_steps)
    assert torch.equal(out, ref)
    _, full_logits, _, _ = generate(model, tok, make("torch", k_bits=16, v_bits=16), n_new)
    backend_gap = (logits - ref_logits).abs().max().item()
    quant_gap = (ref_logits - full_logits).abs().max().item()
    assert backend_gap < 1e-3 and quant_gap > 50 * backend_gap, (backend_gap, quant_gap)
    assert stats.kv_bytes_packed == ref_stats.kv_bytes_packed
    assert held_bytes(cache) < held_bytes(ref_cache), (held_bytes(cache), held_bytes(ref_cache))
    return cache


def check_beams_equal_torch(model, tok, make, layer_cls):
    """Beam search reorders the cache's rows every step: every per-row tensor and each row's
    bookkeeping must move together, so the beams equal the torch backend's."""
    ref = generate(model, tok, make("torch"), n_new=10, num_beams=3)[0]
    out, _, cache, _ = generate(model, tok, make("triton"), n_new=10, num_beams=3)
    assert isinstance(cache.layers[0], layer_cls) and cache.layers[0].k_words.shape[0] == 2 * 3
    assert torch.equal(out, ref)


def check_row_operations(model, tok, method):
    """batch_repeat_interleave / batch_select_indices after prefill: every row still reads back
    exactly the K/V it held. Returns the layer after the operations."""
    _, _, cache, _ = generate(model, tok, method, n_new=6)
    layer = cache.layers[1]
    layer.settle()
    keys, values = layer.materialize()
    assert any(layer.dk) and any(layer.dv)
    layer.batch_repeat_interleave(2)
    k2, v2 = layer.materialize()
    assert torch.equal(k2, keys.repeat_interleave(2, dim=0)) and torch.equal(v2, values.repeat_interleave(2, dim=0))
    layer.batch_select_indices(torch.tensor([3, 0]))
    k3, v3 = layer.materialize()
    assert torch.equal(k3, keys[[1, 0]]) and torch.equal(v3, values[[1, 0]])
    assert layer.start[0] > 0 and layer.start[1] == 0    # the short (left-padded) prompt now leads
    return layer
