"""backend=triton for KIVI: the cache really holds int32 codes, decode attention runs on them, and
greedy generations equal backend=torch's (CPU: Triton's interpreter; GPU: compiled)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from qeval import models  # noqa: E402
from qeval.handle import Handle  # noqa: E402
from qeval.kv_cache import held_bytes, packed_layout_bytes  # noqa: E402
from qeval.methods.base import Bits, Knobs  # noqa: E402
from qeval.methods.kivi import KIVI  # noqa: E402
from qeval.methods.kivi_packed import PackedKIVILayer  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# mixed lengths: left padding, rows that flush key blocks at different steps
PROMPTS = ["the passkey is 4721. what is it?", "hello there"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs", "model",
                                      "tiny-random.yaml"))
    return models.load(cfg, DEV, "float32", "sdpa", 0)


def kivi(backend: str, k_bits=2, v_bits=2, G=16, R=16):
    cfg = OmegaConf.create({"name": "kivi", "group_size": G, "residual_length": R})
    return KIVI(cfg, Knobs(Bits(16, 16, k_bits, v_bits), kv_semantics="cache", backend=backend))


def generate(model, tok, method, n_new=18, **gen):
    """Greedy tokens and per-step logits of the left-padded PROMPTS, through the method's cache."""
    attn = method.attention_implementation("sdpa")
    model.set_attn_implementation(attn or "sdpa")
    handle = Handle(model, tok, method, "cache")
    enc = tok(PROMPTS, return_tensors="pt", padding=True).to(DEV)
    cache = handle.new_cache(enc["attention_mask"])
    out = model.generate(**enc, past_key_values=cache, max_new_tokens=n_new, do_sample=False,
                         pad_token_id=tok.pad_token_id, return_dict_in_generate=True,
                         output_logits=True, **gen)
    model.set_attn_implementation("sdpa")
    handle.stats.observe_cache(cache, method)
    return out.sequences, torch.stack(out.logits), cache, handle.stats


@pytest.mark.parametrize("k_bits,v_bits", [(2, 2), (4, 8)])  # K4V8: mixed widths
def test_triton_greedy_generations_equal_torch(model_and_tokenizer, monkeypatch, k_bits, v_bits):
    model, tok = model_and_tokenizer
    ref, ref_logits, ref_cache, ref_stats = generate(model, tok, kivi("torch", k_bits, v_bits))
    fused_steps = []
    decode = PackedKIVILayer.decode
    monkeypatch.setattr(PackedKIVILayer, "decode",
                        lambda self, *a: fused_steps.append(1) or decode(self, *a))
    out, logits, cache, stats = generate(model, tok, kivi("triton", k_bits, v_bits))
    assert all(isinstance(layer, PackedKIVILayer) for layer in cache.layers)
    # every decode step of every layer ran the fused kernel on the packed words
    assert len(fused_steps) == 2 * (18 - 1), len(fused_steps)
    assert torch.equal(out, ref)
    # same codes, same scales: logits agree to float32 rounding, while quantization itself moves
    # them far more (the comparison has teeth even where the greedy text does not change)
    _, full_logits, _, _ = generate(model, tok, kivi("torch", 16, 16))
    backend_gap = (logits - ref_logits).abs().max().item()
    quant_gap = (ref_logits - full_logits).abs().max().item()
    assert backend_gap < 1e-3 and quant_gap > 50 * backend_gap, (backend_gap, quant_gap)
    # the same blocks were packed: both backends report the same packed-layout figure
    assert stats.kv_bytes_packed == ref_stats.kv_bytes_packed
    # really held: int32 words + scale/zero + residual, below the fake-quantized cache
    held = held_bytes(cache)
    assert held < held_bytes(ref_cache), (held, held_bytes(ref_cache))
    layer = cache.layers[0]
    assert layer.k_words.dtype == torch.int32 and layer.k_words.shape[2] > 0
    assert layer.v_words.dtype == torch.int32 and layer.v_words.shape[2] > 0


def test_held_bytes_approach_the_packed_formula():
    """fp16 model (scale, zero and residual in 2 bytes, as the formula counts them), no padding:
    held = formula + the packed buffers' spare capacity (under one chunk of R tokens)."""
    cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs", "model",
                                      "tiny-random.yaml"))
    model, tok = models.load(cfg, DEV, "float16", "sdpa", 0)
    method = kivi("triton")
    model.set_attn_implementation(method.attention_implementation("sdpa"))
    handle = Handle(model, tok, method, "cache")
    enc = tok(["x" * 40], return_tensors="pt").to(DEV)
    cache = handle.new_cache(enc["attention_mask"])
    model.generate(**enc, past_key_values=cache, max_new_tokens=12, do_sample=False,
                   pad_token_id=tok.pad_token_id)
    packed = packed_layout_bytes(cache, method)   # settles: the last due block is packed
    held = held_bytes(cache)
    fp16_cache = 2 * 2 * 2 * 32 * cache.get_seq_length() * 2   # layers * K,V * heads * D * T * 2
    spare = 2 * 2 * 2 * 16 * 32   # at most R=16 spare tokens at 2 bits + fp16 scale/zero, K and V
    assert packed <= held <= packed + spare, (held, packed)
    assert held < 0.5 * fp16_cache, (held, fp16_cache)


def test_backend_recorded_and_unsupported_layouts_fall_back():
    assert kivi("triton").describe()["kv_backend"] == "triton"
    assert kivi("torch").describe()["kv_backend"] == "torch"
    # 16-bit keys cannot be packed: the torch layer runs, and the row says so
    assert kivi("triton", k_bits=16).describe()["kv_backend"] == "torch"
    assert kivi("triton", G=24, R=48).describe()["kv_backend"] == "torch"


def test_beam_search_on_packed_words_equals_torch(model_and_tokenizer):
    """Beam search reorders the cache's rows every step: codes, scales, residuals and each row's
    bookkeeping must move together, so the beams equal the torch backend's."""
    model, tok = model_and_tokenizer
    ref = generate(model, tok, kivi("torch"), n_new=10, num_beams=3)[0]
    out, _, cache, _ = generate(model, tok, kivi("triton"), n_new=10, num_beams=3)
    assert isinstance(cache.layers[0], PackedKIVILayer) and cache.layers[0].k_words.shape[0] == 2 * 3
    assert torch.equal(out, ref)


def test_row_selection_and_expansion_keep_each_row_intact(model_and_tokenizer):
    """batch_repeat_interleave / batch_select_indices after prefill: every row still reads back
    exactly the K/V it held (the row-local packed blocks move with it)."""
    model, tok = model_and_tokenizer
    method = kivi("triton")
    out, _, cache, _ = generate(model, tok, method, n_new=6)
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
