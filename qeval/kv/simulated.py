"""``simulated`` KV semantics (Qllm-Eval): every K/V is quantized right before attention.

An attention function registered under a name unique to the run
(:func:`qeval.kv.attention.register_attention`), so the quantizer lives in this closure (a qeval
object) rather than on HF modules, and it works whether or not a cache is passed (a stock one-pass
forward included). ``method`` is anything with ``quantize_kv(k, v, pad)``.
"""

from __future__ import annotations

import torch

from qeval.errors import ConfigError
from qeval.kv.attention import register_attention

_calls: dict[str, int] = {}


def _pad_positions(attention_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """(B, 1, kv_len, 1) True where a key is padding. The last query row of a causal mask sees
    every real key, so what it cannot see is padding."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, :kv_len]
    allowed = last if last.dtype == torch.bool else last == 0
    pad = ~allowed
    return pad[:, None, :, None] if pad.any() else None


def register(method, base: str) -> str:
    """Register a quantize-then-attend function over ``base`` (sdpa | eager); returns its name."""
    def make(attend):
        def attention(module, query, key, value, attention_mask, **kwargs):
            _calls[name] += 1
            pad = _pad_positions(attention_mask, key.shape[-2])
            # a recipe keeps kv_keep_layers in full precision; a single method quantizes every layer
            keep = getattr(method, "keep_kv", ())
            if getattr(module, "layer_idx", None) not in keep:
                key, value = method.quantize_kv(key, value, pad)
            return attend(module, query, key, value, attention_mask, **kwargs)
        return attention

    name = register_attention("simulated", base, make)
    _calls[name] = 0
    return name


def install(model, method, base: str) -> str:
    """Switch ``model`` to quantize-then-attend, and prove the function is really called: some
    architectures (Falcon, for one) do not dispatch through ``AttentionInterface``, and there the
    switch would silently measure full precision."""
    name = register(method, base)
    model.set_attn_implementation(name)
    before = _calls[name]
    with torch.no_grad():
        model(input_ids=torch.ones(1, 2, dtype=torch.long, device=model.device))
    if _calls[name] == before:
        raise ConfigError(f"kv_semantics=simulated: {type(model).__name__} does not route attention through "
                          f"transformers' AttentionInterface, so K/V would not be quantized; use kv_semantics=cache")
    return name
