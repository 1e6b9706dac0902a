"""KIVI (arXiv 2402.02750): a residual covering the whole sequence is exactly full precision; keys
are only ever quantized in whole groups of G real tokens (never the lossless one-token group);
per-channel keys beat per-token keys on outlier channels; bad R/G are one-line errors."""

import pytest
import torch
from kv_method_helpers import assert_equals_full_cache, make_handle, make_method
from omegaconf import OmegaConf

from qeval.errors import ConfigError
from qeval.kv.sequence import SequenceState
from qeval.methods.kivi import fake_quantize_keys, fake_quantize_values
from qeval.quant.primitives import fake_quantize, relative_error


def test_residual_longer_than_the_sequence_is_exactly_full_precision():
    h = make_handle("kivi", bits=2, residual_length=256)
    assert_equals_full_cache(h, torch.randint(5, 90, (1, 40)))


def _drive(layer, prompt: int, steps: int, b: int = 1, pad=None):
    torch.manual_seed(0)
    ks, vs = [], []
    for t in [prompt] + [1] * steps:
        k, v = torch.randn(b, 2, t, 16), torch.randn(b, 2, t, 16)
        layer.update(k, v)
        ks.append(k), vs.append(v)
    layer.settle()
    return torch.cat(ks, -2), torch.cat(vs, -2)


def test_keys_are_flushed_only_in_whole_blocks_of_real_tokens():
    m = make_method("kivi", bits=2, group_size=8, residual_length=16).kv
    seen = []
    compress = m._compress_keys
    m._compress_keys = lambda k, first: seen.append(k.shape[-2]) or compress(k, first)
    layer = m.make_cache_layer(0, SequenceState())
    k, v = _drive(layer, prompt=37, steps=30)
    # prompt: first 37 - 37 % 16 = 32 keys, then a block of 16 each time the residual fills
    assert seen == [32, 16, 16]
    assert all(n % 8 == 0 for n in seen)
    done = layer.done["keys"][0]
    assert done == 64
    # quantized part differs from the input (not lossless), the residual is untouched
    assert not torch.equal(layer.keys[..., :done, :], k[..., :done, :])
    assert torch.equal(layer.keys[..., done:, :], k[..., done:, :])
    # values: everything but the newest R tokens is quantized, token by token
    assert layer.done["values"][0] == k.shape[-2] - 16
    assert torch.equal(layer.values[..., -16:, :], v[..., -16:, :])


def test_key_groups_count_from_each_rows_first_real_token():
    m = make_method("kivi", bits=2, group_size=8, residual_length=16).kv
    mask = torch.tensor([[0] * 5 + [1] * 20, [1] * 25])
    layer = m.make_cache_layer(0, SequenceState(mask))
    _drive(layer, prompt=25, steps=0, b=2)
    assert layer.start == [5, 0]
    assert layer.done["keys"] == [5 + 16, 16]      # 20 real tokens -> 16 quantized; 25 -> 16


def test_per_channel_keys_beat_per_token_keys_on_outlier_channels():
    torch.manual_seed(0)
    k = torch.randn(2, 4, 128, 64)
    k[..., [3, 17, 40]] = 3 * k[..., [3, 17, 40]] + 20    # a few large, offset channels, as in real keys
    per_channel = relative_error(k, fake_quantize_keys(k, 2, 32))
    per_token = relative_error(k, fake_quantize(k, 2, -1, 32))
    assert per_channel < 0.5 * per_token, (per_channel, per_token)


def test_right_aligned_key_groups_exclude_filler_and_values_group_channels():
    torch.manual_seed(0)
    k = torch.randn(1, 1, 13, 8)
    out = fake_quantize_keys(k, 2, 4)
    # the newest 12 tokens form 3 whole groups; the oldest token is a group of its own (exact)
    assert torch.equal(out[..., 1:, :], fake_quantize(k[..., 1:, :], 2, -2, 4))
    assert torch.equal(out[..., :1, :], k[..., :1, :])
    v = torch.randn(1, 1, 5, 8)
    assert torch.equal(fake_quantize_values(v, 2, 4), fake_quantize(v, 2, -1, 4))


@pytest.mark.parametrize("g,r", [(32, 48), (32, 0), (0, 32)])
def test_bad_group_or_residual_is_a_one_line_error(g, r):
    from method_configs import check_params
    cfg = OmegaConf.create({"method": {"name": "kivi", "group_size": g, "residual_length": r}})
    with pytest.raises(ConfigError, match="method.(group_size|residual_length)"):
        check_params(cfg)
