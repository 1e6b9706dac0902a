"""backend=triton for GEAR: the cache really holds KIVI-backbone codes, sparse outliers and
low-rank factors, decode runs the fused kernel with the corrections composed around it, and
greedy generations equal backend=torch's (CPU: Triton's interpreter; GPU: compiled)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from qeval import models  # noqa: E402
from qeval.handle import Handle  # noqa: E402
from qeval.kernels import kv_pack  # noqa: E402
from qeval.kv_cache import held_bytes, packed_layout_bytes  # noqa: E402
from qeval.methods.base import Bits, Knobs, SequenceState  # noqa: E402
from qeval.methods.gear import GEAR, outlier_mask  # noqa: E402
from qeval.methods.gear_packed import PackedGEARLayer, pack_block  # noqa: E402
from qeval.methods.kivi_packed import PackedKIVILayer  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# mixed lengths: left padding, rows whose prefill blocks differ (32 and 16 real tokens)
PROMPTS = ["the passkey is 4721. what is it?", "hello there"]
NO_CORRECTIONS = dict(outlier_ratio=0.0, rank_prefill=0, rank_decode=0)


def load(dtype="float32"):
    cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs", "model",
                                      "tiny-random.yaml"))
    return models.load(cfg, DEV, dtype, "sdpa", 0)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load()


def gear(backend: str, k_bits=2, v_bits=2, semantics="cache", **overrides):
    cfg = OmegaConf.create({"name": "gear", "backbone": "kivi", "group_size": 16, "outlier_ratio": 0.02,
                            "rank_prefill": 4, "rank_decode": 2, "rank_ratio": None,
                            "power_iterations": 3, "stream_block": 16, **overrides})
    return GEAR(cfg, Knobs(Bits(16, 16, k_bits, v_bits), kv_semantics=semantics, backend=backend))


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


@pytest.mark.parametrize("k_bits,v_bits", [(2, 2), (4, 2)])  # K4V2: mixed widths
def test_triton_greedy_generations_equal_torch(model_and_tokenizer, monkeypatch, k_bits, v_bits):
    model, tok = model_and_tokenizer
    ref, ref_logits, ref_cache, ref_stats = generate(model, tok, gear("torch", k_bits, v_bits))
    fused_steps = []
    decode = PackedGEARLayer.decode
    monkeypatch.setattr(PackedGEARLayer, "decode",
                        lambda self, *a: fused_steps.append(1) or decode(self, *a))
    out, logits, cache, stats = generate(model, tok, gear("triton", k_bits, v_bits))
    assert all(isinstance(layer, PackedGEARLayer) for layer in cache.layers)
    # every decode step of every layer ran the fused kernel on the packed words
    assert len(fused_steps) == 2 * (18 - 1), len(fused_steps)
    assert torch.equal(out, ref)
    # same codes, outliers and factors: logits agree to float32 rounding, while quantization
    # itself moves them far more (the comparison has teeth even where the greedy text does not)
    _, full_logits, _, _ = generate(model, tok, gear("torch", 16, 16))
    backend_gap = (logits - ref_logits).abs().max().item()
    quant_gap = (ref_logits - full_logits).abs().max().item()
    assert backend_gap < 1e-3 and quant_gap > 50 * backend_gap, (backend_gap, quant_gap)
    # the same blocks were compressed alike: both backends report the same packed-layout figure
    assert stats.kv_bytes_packed == ref_stats.kv_bytes_packed
    held = held_bytes(cache)
    assert held < held_bytes(ref_cache), (held, held_bytes(ref_cache))
    layer = cache.layers[0]
    assert layer.k_words.dtype == torch.int32 and layer.v_words.dtype == torch.int32
    # prefill blocks of 32 and 16 real tokens (rank 4), then a streamed block (rank 2)
    assert layer.blocks == [[(0, 32, 4), (32, 16, 2)], [(0, 16, 4)]], layer.blocks
    assert all(layer.n_slots) and layer.k_sidx.dtype == torch.int32


def test_corrections_are_applied_in_decode(model_and_tokenizer):
    """Without outliers and low rank the packed run is the KIVI backbone alone and equals the
    torch backend's; the default run differs from it by far more than the backends do."""
    model, tok = model_and_tokenizer
    bare_ref, bare_ref_logits, _, _ = generate(model, tok, gear("torch", **NO_CORRECTIONS), n_new=10)
    bare, bare_logits, cache, _ = generate(model, tok, gear("triton", **NO_CORRECTIONS), n_new=10)
    assert torch.equal(bare, bare_ref)
    backend_gap = (bare_logits - bare_ref_logits).abs().max().item()
    assert backend_gap < 1e-3
    assert not any(layer.n_slots[0] or layer.k_u.shape[2] for layer in cache.layers)
    _, logits, _, _ = generate(model, tok, gear("triton"), n_new=10)
    assert (logits - bare_logits).abs().max().item() > 50 * max(backend_gap, 1e-6)


def attend(query, keys, values, valid, scale):
    """Reference attention of (B, Hq, 1, D) over (B, Hkv, T, D) K/V at ``valid`` (B, T) positions."""
    rep = query.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(rep, 1).float(), values.repeat_interleave(rep, 1).float()
    s = torch.einsum("bhd,bhtd->bht", query[:, :, 0].float(), k) * scale
    s = s.masked_fill(~valid[:, None], float("-inf"))
    return torch.einsum("bht,bhtd->bhd", s.softmax(-1), v)


def test_decode_equals_attention_over_the_corrected_cache(model_and_tokenizer):
    """Decode (kernel + composed corrections) = attention over Q + S + L materialized; the
    kernel alone (the layer's corrections disabled) = attention over the backbone Q alone."""
    model, tok = model_and_tokenizer
    _, _, cache, _ = generate(model, tok, gear("triton"), n_new=6)
    layer = cache.layers[0]
    layer.settle()
    B, T, D = len(layer.start), layer.length, layer.k_res.shape[3]
    valid = torch.arange(T, device=DEV)[None] >= torch.tensor(layer.start, device=DEV)[:, None]
    query = torch.randn(B, 4, 1, D, device=DEV)
    keys, values = layer.materialize()
    out = layer.decode(query, 0.3)
    assert (out - attend(query, keys, values, valid, 0.3)).abs().max() < 1e-5
    bk, bv = PackedKIVILayer.materialize(layer)
    backbone = PackedKIVILayer.decode(layer, query, 0.3)
    assert (backbone - attend(query, bk, bv, valid, 0.3)).abs().max() < 1e-5
    assert (out - backbone).abs().max() > 1e-2
    for name in ("k_sval", "v_sval", "k_u", "v_u"):
        getattr(layer, name).zero_()
    assert torch.equal(layer.decode(query, 0.3), backbone)


def test_packed_cache_holds_what_the_torch_cache_holds():
    """Fed the same K/V (left-padded, a multi-token step among one-token steps), the packed layer
    reads back the torch layer's compressed cache to float rounding, block for block."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, :9] = 0
    layers = [gear(b).make_cache_layer(0, SequenceState(mask)) for b in ("torch", "triton")]
    steps = [37, 1, 1, 21] + [1] * 12    # the 21-token step leaves a 32-token streamed block
    for n in steps:
        k, v = (torch.randn(2, 2, n, 32, generator=g) * 2 for _ in range(2))
        for layer in layers:
            layer.update(k, v)
    for layer in layers:
        layer.settle()
    ref, packed = layers
    keys, values = packed.materialize()
    real = torch.arange(ref.keys.shape[2])[None] >= torch.tensor([0, 9])[:, None]
    assert ref.done["keys"] == [s + dk for s, dk in zip(packed.start, packed.dk)]
    assert packed.blocks[0][:2] == [(0, 32, 4), (32, 16, 2)] and packed.blocks[1][0] == (0, 16, 4)
    for x, y in ((keys, ref.keys), (values, ref.values)):
        assert ((x - y).abs().amax((1, 3)) * real).max() < 1e-5
    assert packed.packed_bytes() == ref.packed_bytes()


@pytest.mark.parametrize("which", ["k", "v"])
def test_packed_backbone_is_the_torch_backbone(which):
    """The packed codes (outliers kept out of min/max) give exactly GEAR's KIVI backbone."""
    x = torch.randn(2, 2, 32, 32)
    x[..., 3] *= 10
    mask = outlier_mask(x, 0.05)
    method = gear("triton")
    (words, scale, zero), q = pack_block(x, 2, 16, which, mask)
    assert torch.equal(q, method.quantizer(which)(x, mask))
    # the words the kernel reads dequantize to that very Q
    dequantize = kv_pack.dequantize_keys if which == "k" else kv_pack.dequantize_values
    assert torch.equal(dequantize(words, scale, zero, 2, 16), q)


def test_held_bytes_fall_well_below_the_torch_cache():
    """fp16 model: the packed layer holds the formula's parts plus small padding (W slots,
    U columns past a block's rank, the token -> block map), well below the fp16 cache."""
    model, tok = load("float16")
    held = {}
    for backend in ("torch", "triton"):
        method = gear(backend)
        model.set_attn_implementation(method.attention_implementation("sdpa") or "sdpa")
        handle = Handle(model, tok, method, "cache")
        enc = tok(["x" * 100], return_tensors="pt").to(DEV)
        cache = handle.new_cache(enc["attention_mask"])
        model.generate(**enc, past_key_values=cache, max_new_tokens=40, do_sample=False,
                       pad_token_id=tok.pad_token_id)
        packed = packed_layout_bytes(cache, method)
        held[backend] = held_bytes(cache)
    assert packed <= held["triton"] <= 1.3 * packed, (held, packed)
    assert held["triton"] < 0.65 * held["torch"], held


def test_backend_recorded_and_unsupported_layouts_fall_back():
    assert gear("triton").describe()["kv_backend"] == "triton"
    assert gear("torch").describe()["kv_backend"] == "torch"
    assert gear("triton", backbone="uniform").describe()["kv_backend"] == "torch"
    assert gear("triton", k_bits=3).describe()["kv_backend"] == "torch"
    assert gear("triton", semantics="simulated").describe()["kv_backend"] == "torch"
    assert gear("triton", group_size=8, stream_block=16).describe()["kv_backend"] == "torch"


def test_beam_search_on_packed_cache_equals_torch(model_and_tokenizer):
    """Beam search reorders the rows every step: codes, outliers, factors, residuals and each
    row's bookkeeping move together, so the beams equal the torch backend's."""
    model, tok = model_and_tokenizer
    ref = generate(model, tok, gear("torch"), n_new=10, num_beams=3)[0]
    out, _, cache, _ = generate(model, tok, gear("triton"), n_new=10, num_beams=3)
    assert isinstance(cache.layers[0], PackedGEARLayer) and cache.layers[0].k_words.shape[0] == 2 * 3
    assert torch.equal(out, ref)


def test_row_selection_and_expansion_keep_each_row_intact(model_and_tokenizer):
    model, tok = model_and_tokenizer
    _, _, cache, _ = generate(model, tok, gear("triton"), n_new=6)
    layer = cache.layers[1]
    layer.settle()
    keys, values = layer.materialize()
    layer.batch_repeat_interleave(2)
    k2, v2 = layer.materialize()
    assert torch.equal(k2, keys.repeat_interleave(2, dim=0))
    assert torch.equal(v2, values.repeat_interleave(2, dim=0))
    layer.batch_select_indices(torch.tensor([3, 0]))
    k3, v3 = layer.materialize()
    assert torch.equal(k3, keys[[1, 0]]) and torch.equal(v3, values[[1, 0]])
    assert layer.start[0] > 0 and layer.start[1] == 0    # the short (left-padded) prompt now leads
    with pytest.raises(NotImplementedError):
        layer.crop(1)
