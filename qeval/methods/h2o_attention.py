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
    """(B, Hq, q, D) x (B, Hkv, kv, D) -> (B, Hq, q, kv) float32 softmax probabilities (the reference
    that ``key_scores`` must sum to)."""
    b, hq, q, d = query.shape
    hkv, kv = key.shape[1], key.shape[-2]
    grouped = query.float().reshape(b, hkv, hq // hkv * q, d)
    scores = (torch.matmul(grouped, key.float().transpose(2, 3)) * scaling).reshape(b, hq, q, kv)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # a fully masked row (a pad query) gives NaN; it carries no attention
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


# query rows per chunk of the scoring pass: (B, Hq, rows, kv) float32 stays a few MB, so the
# masked softmax runs in cache instead of streaming a (q x kv) matrix through memory four times
CHUNK_ELEMENTS = 1 << 20


def key_scores(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scaling: float,
               query_real: torch.Tensor) -> torch.Tensor:
    """The attention each key received at this step, summed over this step's real queries and over
    the query heads that share its KV head: (B, Hkv, kv) float32.

    Equal to summing ``attention_probs`` (weighted by ``query_real``, (B, Hkv, q) bool) over heads of
    a group and queries, without holding the (q x kv) probabilities: queries go in chunks, and a
    chunk only scores the keys up to its last query (causal: later keys are masked for it anyway,
    which halves a prefill's work). A masked score is the dtype's minimum rather than -inf, so a
    fully masked (pad) row is finite; its weight is zero."""
    b, hq, q, d = query.shape
    hkv, kv = key.shape[1], key.shape[-2]
    g = hq // hkv
    out = torch.zeros(b, hkv, kv, dtype=torch.float32, device=query.device)
    qf = query.float().reshape(b, hkv, g, q, d)
    kf = key.float()
    weight = query_real.float()[:, :, None, :, None]                           # (B, Hkv, 1, q, 1)
    rows = max(1, CHUNK_ELEMENTS // max(1, b * hq * kv))
    for i0 in range(0, q, rows):
        i1 = min(q, i0 + rows)
        hi = kv - q + i1                                                       # causal: keys < hi
        c = i1 - i0
        s = torch.matmul(qf[:, :, :, i0:i1].reshape(b, hkv, g * c, d), kf[:, :, :hi].transpose(2, 3))
        s = s.mul_(scaling).view(b, hkv, g, c, hi)
        a = allowed[..., i0:i1, :hi]
        # (B|1, 1|Hq, c, hi) -> (B|1, 1|Hkv, 1|g, c, hi)
        a = a[:, :, None] if a.shape[1] == 1 else a.reshape(a.shape[0], hkv, g, c, hi)
        s.masked_fill_(~a, torch.finfo(torch.float32).min)
        p = torch.softmax(s, dim=-1).mul_(weight[:, :, :, i0:i1])
        out[..., :hi] += p.sum(dim=(2, 3))
    return out


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
            if weights is not None:   # eager hands its probabilities back
                layer.observe(weights.float())
            else:                     # sdpa does not: score the keys in a second, chunked pass
                scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
                layer.add_scores(key_scores(query, key, allowed, scaling, layer.valid[:, :, -q_len:]))
            return out, weights
        return attention

    return register_attention("h2o", base, make)
