"""``simulated`` KV semantics (Qllm-Eval): every K/V is quantized right before attention.

This is an attention function registered with transformers' ``AttentionInterface`` under a name
unique to the run, so the quantizer lives in this closure (a qeval object) rather than on HF
modules, and it works whether or not a cache is passed (a stock one-pass forward included). The
matching mask function is registered under the same name: without it the mask arrives as None
and padded batches silently go wrong.
"""

from __future__ import annotations

import itertools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from qeval.methods.base import Method

_ids = itertools.count()
_calls: dict[str, int] = {}


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain softmax attention over (B, H, T, D) with GQA key/value heads repeated."""
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _pad_positions(attention_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """(B, 1, kv_len, 1) True where a key is padding. The last query row of a causal mask sees
    every real key, so what it cannot see is padding."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, :kv_len]
    allowed = last if last.dtype == torch.bool else last == 0
    pad = ~allowed
    return pad[:, None, :, None] if pad.any() else None


def register_attention(kind: str, base: str, make) -> str:
    """Register ``make(attend)`` (an attention function wrapping the ``base`` one: sdpa | eager)
    under a name unique to the run, with the base's mask function; returns the name.

    Every qeval attention function goes through here, so the mask function is never forgotten."""
    attend = {"sdpa": sdpa_attention_forward, "eager": eager_attention}[base]
    name = f"qeval_{kind}_{base}_{next(_ids)}"
    AttentionInterface.register(name, make(attend))
    AttentionMaskInterface.register(name, {"sdpa": sdpa_mask, "eager": eager_mask}[base])
    return name


def register(method: Method, base: str) -> str:
    """Register a quantize-then-attend function over ``base`` (sdpa | eager); returns its name."""
    def make(attend):
        def attention(module, query, key, value, attention_mask, **kwargs):
            _calls[name] += 1
            pad = _pad_positions(attention_mask, key.shape[-2])
            key, value = method.quantize_kv(key, value, pad)
            return attend(module, query, key, value, attention_mask, **kwargs)
        return attention

    name = register_attention("simulated", base, make)
    _calls[name] = 0
    return name


def install(model, method: Method, base: str) -> str:
    """Switch ``model`` to quantize-then-attend, and prove the function is really called: some
    architectures (Falcon, for one) do not dispatch through ``AttentionInterface``, and there the
    switch would silently measure full precision."""
    name = register(method, base)
    model.set_attn_implementation(name)
    before = _calls[name]
    with torch.no_grad():
        model(input_ids=torch.ones(1, 2, dtype=torch.long, device=model.device))
    if _calls[name] == before:
        from qeval.validate import ConfigError
        raise ConfigError(f"kv_semantics=simulated: {type(model).__name__} does not route attention through "
                          f"transformers' AttentionInterface, so K/V would not be quantized; use kv_semantics=cache")
    return name
