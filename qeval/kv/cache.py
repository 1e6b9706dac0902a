"""KV caches for the ``cache`` semantics, and the byte accounting every KV run reports.

A qeval cache is a plain ``transformers.Cache(layers=[...])``; the method decides what a layer
is (``method.make_cache_layer``), and round-to-nearest methods get :class:`StoreQuantizedLayer`
(``method.quantize_kv``). ``SequenceState`` carries the padding mask, which transformers does not hand to a layer.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer

from qeval.kv.sequence import SequenceState


def cache_kwarg(model) -> str:
    """The keyword a model's ``forward`` and ``generate`` take a cache by: ``cache`` since
    transformers renamed it (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class QevalCache(Cache):
    """A ``Cache`` whose layers are built by a method; ``seq`` is shared with every layer."""

    def __init__(self, method, n_layers: int, attention_mask: torch.Tensor | None = None):
        self.method = method
        self.seq = SequenceState(attention_mask)
        super().__init__(layers=[method.make_cache_layer(i, self.seq) for i in range(n_layers)])


class StoreQuantizedLayer(DynamicLayer):
    """``cache`` semantics for round-to-nearest methods.

    The step's own tokens attend in full precision (prefill included); what is stored is the
    quantized K/V, and every later step reads those back. Quantized values are held dequantized
    in the model's dtype (fake quantization): the bytes held are reported as such, and the bytes
    a packed layout would need are reported separately.
    """

    def __init__(self, method, seq: SequenceState):
        super().__init__()
        self.method = method
        self.seq = seq

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        pad = self.seq.pad(start, key_states.shape[-2], key_states.shape[0])
        kq, vq = self.method.quantize_kv(key_states, value_states, pad)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys = torch.cat([self.keys, kq], dim=-2)
        self.values = torch.cat([self.values, vq], dim=-2)
        return keys, values

    def packed_bytes(self) -> int:
        if not self.is_initialized or self.keys.numel() == 0:
            return 0
        return self.method.kv_packed_bytes(self.keys, self.values)


def _tensors(obj) -> list[torch.Tensor]:
    out = []
    for v in vars(obj).values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(t for t in v if isinstance(t, torch.Tensor))
    return out


def held_bytes(cache: Cache | None) -> int:
    """Bytes of every tensor the cache's layers hold right now: a measurement, not a formula."""
    if cache is None:
        return 0
    seen, total = set(), 0
    for layer in cache.layers:
        for t in _tensors(layer):
            key = (t.data_ptr(), t.nbytes)
            if key not in seen:
                seen.add(key)
                total += t.nbytes
    return total


def packed_layout_bytes(cache: Cache | None, method) -> int:
    """Bytes a packed low-bit layout of the same cache would need (from the method's formula)."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "packed_bytes"):
            total += layer.packed_bytes()
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += method.kv_packed_bytes(layer.keys, layer.values)
    return total
