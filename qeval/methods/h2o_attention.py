"""The attention function H2O needs: the usual attention, plus the softmax probabilities handed
to the H2O cache layer that just took this step's K/V (arXiv 2306.14048).

Registered with transformers' ``AttentionInterface`` under a name unique to the run, together with
the matching mask function (without it the mask arrives as None). State lives in qeval objects:
the method remembers which layer updated last (``take_pending``); a forward without an H2O cache
(e.g. a plain ``DynamicCache``) finds nothing pending and runs the base attention unchanged.
"""

from __future__ import annotations

import torch

from qeval.simulated_attention import register_attention


def allowed_keys(attention_mask: torch.Tensor | None, q_len: int, kv_len: int,
                 device: torch.device) -> torch.Tensor:
    """(B or 1, 1 or H, q, kv) bool: which keys each query may see, from any mask form transformers
    passes (None = causal, bool = allowed, float = additive)."""
    if attention_mask is None:
        # the newest q_len keys are this step's queries: causal among them, everything older visible
        i = torch.arange(q_len, device=device)[:, None]
        j = torch.arange(kv_len, device=device)[None, :]
        return (j <= kv_len - q_len + i)[None, None]
    m = attention_mask[..., :kv_len]
    if m.dtype == torch.bool:
        return m
    return m > torch.finfo(m.dtype).min / 2


def attention_probs(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """(B, Hq, q, D) x (B, Hkv, kv, D) -> (B, Hq, q, kv) float32 softmax probabilities."""
    b, hq, q, d = query.shape
    hkv, kv = key.shape[1], key.shape[-2]
    # GQA without copying the cache: (B, Hq, q, D) -> (B, Hkv, Hq // Hkv * q, D) against (B, Hkv, kv, D)
    grouped = query.float().reshape(b, hkv, hq // hkv * q, d)
    scores = (torch.matmul(grouped, key.float().transpose(2, 3)) * scaling).reshape(b, hq, q, kv)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # a fully masked row (a pad query) gives NaN; it carries no attention
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


def register(method, base: str) -> str:
    """Register attend-and-score over ``base`` (sdpa | eager); returns its name."""
    def make(attend):
        def attention(module, query, key, value, attention_mask, **kwargs):
            layer = method.take_pending(module.layer_idx)
            if layer is None:
                return attend(module, query, key, value, attention_mask, **kwargs)
            q_len, kv_len = query.shape[-2], key.shape[-2]
            if layer.compacted:
                # after eviction, slot j no longer is position j: the layer knows which slots are real
                allowed = layer.allowed_slots(q_len, query.shape[1])
                attention_mask = (allowed if base == "sdpa" else
                                  torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
                                  .masked_fill(~allowed, torch.finfo(query.dtype).min))
            else:
                allowed = allowed_keys(attention_mask, q_len, kv_len, query.device)
            out, weights = attend(module, query, key, value, attention_mask, **kwargs)
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            probs = weights.float() if weights is not None else attention_probs(query, key, allowed, scaling)
            layer.observe(probs)
            return out, weights
        return attention

    return register_attention("h2o", base, make)
