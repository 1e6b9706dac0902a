"""backend=triton for GEAR: the cache really holds KIVI-backbone codes, sparse outliers and
low-rank factors, decode runs the fused kernel with the corrections composed around it, and
greedy generations equal backend=torch's (CPU: Triton's interpreter; GPU: compiled)."""

import pytest
import torch
from method_configs import from_knobs, method_params
from packed_backend_helpers import (
    DEV,
    check_beams_equal_torch,
    check_row_operations,
    check_triton_equals_torch,
    compare_backends,
    generate,
    load_tiny,
    prefill_cache,
)

from qeval.kernels import kv_pack
from qeval.kv.cache import (
    cache_kwarg,  # noqa: E402
    held_bytes,
    packed_layout_bytes,
)
from qeval.kv.sequence import SequenceState
from qeval.methods.base import Bits, Knobs
from qeval.methods.gear_packed import PackedGEARLayer, pack_block
from qeval.methods.kivi_packed import PackedKIVILayer
from qeval.model.handle import Handle
from qeval.quant.decompose import outlier_mask

NO_CORRECTIONS = dict(outlier_ratio=0.0, rank_prefill=0, rank_decode=0)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_tiny()


def gear(backend: str, k_bits=2, v_bits=2, semantics="cache", **overrides):
    cfg = method_params("gear", **({"group_size": 16, "stream_block": 16} | overrides))
    return from_knobs("gear", cfg, Knobs(Bits(16, 16, k_bits, v_bits), kv_semantics=semantics, backend=backend))


@pytest.mark.parametrize("k_bits,v_bits", [(2, 2), (4, 2)])  # K4V2: mixed widths
def test_triton_greedy_generations_equal_torch(model_and_tokenizer, monkeypatch, k_bits, v_bits):
    model, tok = model_and_tokenizer
    cache = check_triton_equals_torch(
        model, tok, lambda backend, k_bits=k_bits, v_bits=v_bits: gear(backend, k_bits, v_bits),
        PackedGEARLayer, monkeypatch)
    layer = cache.layers[0]
    assert layer.k_words.dtype == torch.int32 and layer.v_words.dtype == torch.int32
    # prefill blocks of 32 and 16 real tokens (rank 4), then a streamed block (rank 2)
    assert layer.blocks == [[(0, 32, 4), (32, 16, 2)], [(0, 16, 4)]], layer.blocks
    assert all(layer.n_slots) and layer.k_sidx.dtype == torch.int32


def test_corrections_are_applied_in_decode(model_and_tokenizer):
    """Without outliers and low rank the packed run is the KIVI backbone alone and equals the
    torch backend's; the default run differs from it by far more than the backends do."""
    model, tok = model_and_tokenizer
    bare_ref = generate(model, tok, gear("torch", **NO_CORRECTIONS), n_new=6, record=True)
    bare = generate(model, tok, gear("triton", **NO_CORRECTIONS), n_new=6, force=bare_ref[0], record=True)
    gaps = compare_backends(model, bare_ref[:2] + bare_ref[4:], bare[:2] + bare[4:])["gaps"]
    assert not any(layer.n_slots[0] or layer.k_u.shape[2] for layer in bare[2].layers)
    _, logits, _, _ = generate(model, tok, gear("triton"), n_new=6, force=bare_ref[0])
    # the corrections move the logits by far more than the backends differ (see check_triton_equals_torch)
    assert (logits - bare[1]).abs().max().item() > 50 * max(gaps)


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
    assert torch.equal(q, method.kv.quantizer(which)(x, mask))
    # the words the kernel reads dequantize to that very Q
    dequantize = kv_pack.dequantize_keys if which == "k" else kv_pack.dequantize_values
    assert torch.equal(dequantize(words, scale, zero, 2, 16), q)


def test_held_bytes_fall_well_below_the_torch_cache():
    """fp16 model: the packed layer holds the formula's parts plus small padding (W slots,
    U columns past a block's rank, the token -> block map), well below the fp16 cache."""
    model, tok = load_tiny("float16")
    held = {}
    for backend in ("torch", "triton"):
        method = gear(backend)
        model.set_attn_implementation(method.attention_implementation("sdpa") or "sdpa")
        handle = Handle(model, tok, method, "cache")
        enc = tok(["x" * 100], return_tensors="pt").to(DEV)
        cache = handle.new_cache(enc["attention_mask"])
        model.generate(**enc, **{cache_kwarg(model): cache}, max_new_tokens=40, do_sample=False,
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
    check_beams_equal_torch(*model_and_tokenizer, lambda backend: gear(backend), PackedGEARLayer)


def test_row_selection_and_expansion_keep_each_row_intact(model_and_tokenizer):
    layer = check_row_operations(*model_and_tokenizer, gear("triton"))
    with pytest.raises(NotImplementedError):
        layer.crop(1)


def test_prefill_leaves_only_the_partial_block_in_full_precision(model_and_tokenizer):
    """After a prefill of 100 tokens (blocks of 16) the prompt's first 96 tokens are one compressed
    block right away; only the 4 past it wait in full precision for the next block."""
    cache, H, D = prefill_cache(*model_and_tokenizer, gear("triton"), 100)
    for layer in cache.layers:
        assert layer.k_res.shape[2] == layer.v_res.shape[2] == 4, (layer.k_res.shape, layer.v_res.shape)
        assert layer.blocks == [[(0, 96, 4)]] and layer.dk == layer.dv == [96]
    # per element of the 96: 2-bit codes 0.25 byte + fp32 scale / zero per 16 0.5 + 60 outliers
    # per head at 8 bytes 0.16 + rank-4 fp32 U 0.5, against 4; the 4 fp32 tokens and W's first
    # chunk of 4 block slots (4 x 4 x 32 fp32 per head) bring it to 0.55 of the fp32 cache; the
    # prompt held in full precision would be 1.0
    assert held_bytes(cache) < 0.6 * len(cache.layers) * 2 * H * 100 * D * 4
