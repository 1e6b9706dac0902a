"""backend=triton for KIVI: the cache really holds int32 codes, decode attention runs on them, and
greedy generations equal backend=torch's (CPU: Triton's interpreter; GPU: compiled)."""

import pytest
import torch
from method_configs import from_knobs, method_params
from packed_backend_helpers import (
    DEV,
    check_beams_equal_torch,
    check_row_operations,
    check_triton_equals_torch,
    load_tiny,
    prefill_cache,
)

from qeval.kv.cache import (
    cache_kwarg,  # noqa: E402
    held_bytes,
    packed_layout_bytes,
)
from qeval.methods.base import Bits, Knobs
from qeval.methods.kivi_packed import PackedKIVILayer
from qeval.model.handle import Handle


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_tiny()


def kivi(backend: str, k_bits=2, v_bits=2, G=16, R=16):
    return from_knobs("kivi", method_params("kivi", group_size=G, residual_length=R),
                      Knobs(Bits(16, 16, k_bits, v_bits), kv_semantics="cache", backend=backend))


@pytest.mark.parametrize("k_bits,v_bits", [(2, 2), (4, 8)])  # K4V8: mixed widths
def test_triton_greedy_generations_equal_torch(model_and_tokenizer, monkeypatch, k_bits, v_bits):
    model, tok = model_and_tokenizer
    cache = check_triton_equals_torch(
        model, tok, lambda backend, k_bits=k_bits, v_bits=v_bits: kivi(backend, k_bits, v_bits),
        PackedKIVILayer, monkeypatch)
    layer = cache.layers[0]
    assert layer.k_words.dtype == torch.int32 and layer.k_words.shape[2] > 0
    assert layer.v_words.dtype == torch.int32 and layer.v_words.shape[2] > 0


def test_held_bytes_approach_the_packed_formula():
    """fp16 model (scale, zero and residual in 2 bytes, as the formula counts them), no padding:
    held = formula + the packed buffers' spare capacity (under one chunk of R tokens)."""
    model, tok = load_tiny("float16")
    method = kivi("triton")
    model.set_attn_implementation(method.attention_implementation("sdpa"))
    handle = Handle(model, tok, method, "cache")
    enc = tok(["x" * 40], return_tensors="pt").to(DEV)
    cache = handle.new_cache(enc["attention_mask"])
    model.generate(**enc, **{cache_kwarg(model): cache}, max_new_tokens=12, do_sample=False,
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
    check_beams_equal_torch(*model_and_tokenizer, lambda backend: kivi(backend), PackedKIVILayer)


def test_row_selection_and_expansion_keep_each_row_intact(model_and_tokenizer):
    check_row_operations(*model_and_tokenizer, kivi("triton"))


def test_prefill_leaves_only_the_residual_in_full_precision(model_and_tokenizer):
    """After a prefill of 100 >> R tokens the layer holds packed words, not the prompt: keys past
    the last whole block of R and the last R values stay in full precision, nothing more."""
    cache, H, D = prefill_cache(*model_and_tokenizer, kivi("triton"), 100)
    for layer in cache.layers:
        assert layer.k_res.shape[2] == 100 % 16 and layer.v_res.shape[2] == 16, (layer.k_res.shape, layer.v_res.shape)
        assert layer.dk == [96] and layer.dv == [84]
    fp32_cache = len(cache.layers) * 2 * H * 100 * D * 4
    # 2-bit codes with fp32 scale / zero per 16 are 0.75 byte per element against 4; with 20 of
    # 100 tokens in fp32 that is about 0.35 of the fp32 cache (R-token chunks of capacity add
    # under 0.04); holding the prompt in full precision would be 1.0
    assert held_bytes(cache) < 0.45 * fp32_cache, (held_bytes(cache), fp32_cache)
