"""Eviction and quantization of one cache: an evicting layer (H2O) keeps the tokens its policy
chooses, and the recipe's KV part quantizes the kept ones once they age out of its full-precision
window, with the statistics it would use in its own cache.

Each stream (keys, values) follows a :class:`Rule` from the KV part: the newest ``lag`` kept tokens
of each (row, KV head) stay full precision; older kept tokens still in full precision are quantized
in whole blocks of ``block`` tokens, oldest first. KIVI's keys: ``lag`` 0, blocks of R (its
residual, flushed once R tokens wait), per-channel groups of G within; its values: ``lag`` R,
per token. Per-token round-to-nearest (``kv=uniform``, ``kv=group``): ``lag`` 0, per token, which
is its own cache's "the step attends in full precision, what is stored is quantized".

Quantizing runs after the step's attention and eviction (the layer calls :meth:`Aging.step`),
so a token that is evicted before it ages is never quantized, and a quantized token, once
evicted, is gone with its group's statistics unchanged. Under H2O a KV head keeps its own tokens,
so blocks are formed per (row, head) from the tokens that head kept: KIVI's key groups hold G
kept tokens in position order, which need not be consecutive positions. That is the composition's
definition (documented in the README), not something KIVI's authors ran.

Held as fake quantization (the dequantized K/V in the model's dtype), as the KV parts' own torch
caches hold them; ``packed_bytes`` counts quantized tokens by the part's formula and the rest as fp16.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch

FP16_BYTES = 2


@dataclass(frozen=True)
class Rule:
    lag: int            # the newest kept tokens that stay full precision
    block: int          # aged tokens are quantized in whole blocks of this many, oldest first
    # (B, H, n, D) tokens in position order, exclude (B, H, n, D) bool or None -> fake-quantized
    quantize: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    # bytes of a packed layout of quantized tokens of shape (1, 1, n, D)
    packed_bytes: Callable[[torch.Size], int]


@dataclass(frozen=True)
class Aging:
    keys: Rule
    values: Rule

    def step(self, layer, newness: torch.Tensor, valid: torch.Tensor) -> None:
        """Quantize what aged in ``layer`` (``keys``/``values`` (B, H, W, D) with ``raw_keys`` /
        ``raw_values`` (B, H, W) bool: still full precision). ``newness`` (B, H, W): larger is a
        newer token; ``valid`` (B, H, W): the slot holds a kept token."""
        # rank of each slot from the newest kept token of its (row, head): 0 = newest
        key = torch.where(valid, newness, torch.full_like(newness, -1))
        order = key.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(key.shape[-1], device=key.device)
                                                .expand_as(order))
        for name, rule in (("keys", self.keys), ("values", self.values)):
            raw = getattr(layer, f"raw_{name}")
            aged = raw & valid & (rank >= rule.lag)
            due = aged.sum(-1, keepdim=True) // rule.block * rule.block          # (B, H, 1)
            most = int(due.max()) if due.numel() else 0
            if most == 0:
                continue
            # the oldest aged slots first: (B, H, most)
            big = torch.iinfo(newness.dtype).max
            idx = torch.where(aged, newness, torch.full_like(newness, big)).argsort(dim=-1, stable=True)[..., :most]
            take = torch.arange(most, device=idx.device) < due                   # (B, H, most)
            x = getattr(layer, name)
            d = x.shape[-1]
            gather = idx[..., None].expand(-1, -1, -1, d)
            chunk = x.gather(2, gather)                                          # (B, H, most, D)
            exclude = None if bool(take.all()) else (~take)[..., None].expand_as(chunk)
            done = torch.where(take[..., None], rule.quantize(chunk, exclude), chunk)
            x.scatter_(2, gather, done)
            raw.scatter_(2, idx, raw.gather(2, idx) & ~take)

    def packed_bytes(self, layer, kept: torch.Tensor) -> int:
        """Bytes of the kept tokens (``kept`` (B, H, W) bool): quantized ones by each rule's
        formula, full-precision ones at fp16."""
        d = layer.keys.shape[-1]
        total = 0
        for name, rule in (("keys", self.keys), ("values", self.values)):
            raw = getattr(layer, f"raw_{name}") & kept
            quantized = int((kept & ~raw).sum())
            total += int(raw.sum()) * d * FP16_BYTES
            if quantized:
                total += rule.packed_bytes(torch.Size((1, 1, quantized, d)))
        return total
