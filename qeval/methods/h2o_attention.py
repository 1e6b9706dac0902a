"""The attention function H2O needs: the usual attention, plus the softmax probabilities handed
to the H2O cache layer that just took this step's K/V (arXiv 2306.14048).

Registered with transformers' ``AttentionInterface`` under a name unique to the run, together with
the matching mask function (without it the mask arrives as None). State lives in qeval objects:
the method's :class:`qeval.kv.attention.PendingLayers` holds the layer that updated last; a forward without an H2O cache
(e.g. a plain ``DynamicCache``) finds nothing pending and runs the base attention unchanged.
"""

from __future__ import annotations

import torch

from qeval.kv.attention import attention_mask as masked
from qeval.kv.attention import register_attention


def allowed_keys(attention_mask: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(B or 1, 1 or H, q, kv) bool: which keys each query may see, from the mask transformers
    passes (bool = allowed, float = additive). None, a purely causal step, never reaches here:
    ``key_scores`` handles it without a mask."""
    m = attention_mask[..., :kv_len]
    if m.dtype == torch.bool:
        return m
    return m > torch.finfo(m.dtype).min / 2


# query rows per chunk of the scoring pass: (B, Hq, rows, kv) float32 stays a few MB, so the
# masked softmax runs in cache instead of streaming a (q x kv) matrix through memory four times
CHUNK_ELEMENTS = 1 << 20
# and at most this many rows, so the causal truncation skips about half of a prefill's scores
CHUNK_ROWS = 64


def key_scores(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None, scaling: float,
               query_real: torch.Tensor | None = None) -> torch.Tensor:
    """The attention each key received at this step, summed over this step's real queries and over
    the query heads that share its KV head: (B, Hkv, kv) float32.

    Equal to summing the masked softmax probabilities (weighted by ``query_real``, (B, Hkv, q)
    bool; None = all real) over heads of a group and queries, without holding them: queries go
    in chunks, and a chunk only scores the keys up to its last query (causal: later keys are masked
    for it anyway, which halves a prefill's work). ``allowed`` None means plain causal: only the
    chunk's diagonal block needs masking. A masked score is the dtype's minimum rather than -inf,
    so a fully masked (pad) row stays finite; its weight is zero."""
    b, hq, q, d = query.shape
    hkv, kv = key.shape[1], key.shape[-2]
    g = hq // hkv
    if q == 1 and allowed is None and query_real is None:
        # a decode step over slots that are all visible: the few ops below are the whole pass
        s = torch.matmul((query.float() * scaling).reshape(b, hkv, g, d), key.float().transpose(2, 3))
        return torch.softmax(s, dim=-1).sum(dim=2)
    out = torch.zeros(b, hkv, kv, dtype=torch.float32, device=query.device)
    # the scale goes on the (q x D) queries, not on the (q x kv) scores
    qf = (query.float() * scaling).reshape(b, hkv, g, q, d)
    kf = key.float()
    weight = None if query_real is None else query_real.float()[:, :, None, :, None]   # (B, Hkv, 1, q, 1)
    low = torch.finfo(torch.float32).min
    rows = max(1, min(CHUNK_ROWS, CHUNK_ELEMENTS // max(1, b * hq * kv)))
    for i0 in range(0, q, rows):
        i1 = min(q, i0 + rows)
        hi = kv - q + i1                                                       # causal: keys < hi
        c = i1 - i0
        s = torch.matmul(qf[:, :, :, i0:i1].reshape(b, hkv, g * c, d), kf[:, :, :hi].transpose(2, 3))
        s = s.view(b, hkv, g, c, hi)
        if allowed is not None:
            a = allowed[..., i0:i1, :hi]
            # (B|1, 1|Hq, c, hi) -> (B|1, 1|Hkv, 1|g, c, hi)
            a = a[:, :, None] if a.shape[1] == 1 else a.reshape(a.shape[0], hkv, g, c, hi)
            s.masked_fill_(~a, low)
        elif c > 1:
            # query i0 + i sees keys < hi - c + i + 1: only the last c columns hold masked entries
            tri = torch.ones(c, c, dtype=torch.bool, device=s.device).tril()
            s[..., hi - c:].masked_fill_(~tri, low)
        p = torch.softmax(s, dim=-1)
        if weight is not None:
            p.mul_(weight[:, :, :, i0:i1])
        out[..., :hi] += p.sum(dim=(2, 3))
    return out


def register(method, base: str) -> str:
    """Register attend-and-score over ``base`` (sdpa | eager); returns its name."""
    def make(attend):
        def attention(module, query, key, value, attention_mask, **kwargs):
            layer = method.pending.take(module.layer_idx)
            if layer is None:
                return attend(module, query, key, value, attention_mask, **kwargs)
            q_len, kv_len = query.shape[-2], key.shape[-2]
            if layer.compacted and layer.dense and q_len == 1:
                # every held slot is a real, kept token and one query sees them all: no mask
                allowed = attention_mask = None
            elif layer.compacted:
                # after eviction, slot j no longer is position j: the layer knows which slots are real
                allowed = layer.allowed_slots(q_len, query.shape[1])
                attention_mask = masked(allowed, base, query.dtype)
            else:   # None: transformers found the mask purely causal
                allowed = None if attention_mask is None else allowed_keys(attention_mask, kv_len)
            out, weights = attend(module, query, key, value, attention_mask, **kwargs)
            if weights is not None:   # eager hands its probabilities back
                layer.observe(weights.float())
            else:                     # sdpa does not: score the keys in a second, chunked pass
                scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
                real = None if layer.dense else layer.valid[:, :, -q_len:]
                layer.add_scores(key_scores(query, key, allowed, scaling, real))
            return out, weights
        return attention

    return register_attention("h2o", base, make)
