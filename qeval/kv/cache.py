"""KV caches for the ``cache`` semantics, and the byte accounting every KV run reports.

A qeval cache is a plain ``transformers.Cache(layers=[...])``; the method decides what a layer
is (``method.make_cache_layer``), and round-to-nearest methods get :class:`StoreQuantizedLayer`
(``method.quantize_kv``), or :class:`FP8StoredLayer` for an FP8 ``kv_format``, which holds
float8 codes for real (:class:`StaticFP8Layer` with ``kv_scale=static``: one fixed scale per layer).
``SequenceState`` carries the padding mask, which transformers does not hand to a layer.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer

from qeval.kv.sequence import SequenceState
from qeval.quant.formats import fp8


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


def _encode(rounding, x: torch.Tensor, pad: torch.Tensor | None):
    """float8 codes (B, H, T, D) and float32 scales (B, H or 1, T, n) of a chunk of K or V: a
    per-sequence scale (B, 1, 1, 1) is held once per token, so chunks concatenate on T."""
    codes, scale = rounding.encode_fp8(x, pad)
    return codes, scale.expand(*scale.shape[:2], x.shape[-2], scale.shape[-1]).contiguous()


class FP8StoredLayer(StoreQuantizedLayer):
    """``cache`` semantics with K/V held as FP8: ``keys`` / ``values`` are the float8 codes
    (B, H, T, D) and ``k_scale`` / ``v_scale`` their float32 scales (B, H or 1, T, n), so the bytes
    held are the codes' and the scales' (the part's roundings' ``encode_fp8``). Every step reads the stored tokens
    back through :func:`qeval.quant.formats.fp8.decode`, equal to ``method.quantize_kv`` of the
    same tokens, and attends to its own tokens in full precision, like :class:`StoreQuantizedLayer`.
    """

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype
        self.keys = self.values = self.k_scale = self.v_scale = None

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pad = self.seq.pad(self.get_seq_length(), key_states.shape[-2], key_states.shape[0])
        (kc, ks), (vc, vs) = (_encode(self.method.k_rounding, key_states, pad),
                              _encode(self.method.v_rounding, value_states, pad))
        if self.keys is None:
            self.keys, self.k_scale, self.values, self.v_scale = kc, ks, vc, vs
            return key_states, value_states
        keys = torch.cat([fp8.decode(self.keys, self.k_scale, self.dtype), key_states], dim=-2)
        values = torch.cat([fp8.decode(self.values, self.v_scale, self.dtype), value_states], dim=-2)
        self.keys, self.k_scale = torch.cat([self.keys, kc], -2), torch.cat([self.k_scale, ks], -2)
        self.values, self.v_scale = torch.cat([self.values, vc], -2), torch.cat([self.v_scale, vs], -2)
        return keys, values

    def packed_bytes(self) -> int:
        """What is held is already the packed layout: one byte per element plus the scales."""
        return held_bytes_of(self)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.k_scale is not None:
            self.k_scale, self.v_scale = self.k_scale[..., :tokens_to_remove, :], self.v_scale[..., :tokens_to_remove, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self.keys, self.values, self.k_scale, self.v_scale = (
                t.repeat_interleave(repeats, dim=0) for t in (self.keys, self.values, self.k_scale, self.v_scale))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.keys, self.values, self.k_scale, self.v_scale = (
                t[indices, ...] for t in (self.keys, self.values, self.k_scale, self.v_scale))


class StaticFP8Layer(FP8StoredLayer):
    """:class:`FP8StoredLayer` with fixed scales from calibration (``kv_scale=static``, vLLM's
    ``k_scale`` / ``v_scale``: :mod:`qeval.calibration.kv_scales`): ``k_scale`` / ``v_scale`` are
    float32 (1, 1, 1, 1) per tensor or (1, H, 1, 1) per KV head, held once for the layer, not per
    token. Codes are ``fp8.encode(x, scale)``: saturating at ``±max * scale``, so a value beyond the
    calibration's amax is clamped; nothing is taken from the K/V themselves (padding included).
    """

    def __init__(self, method, seq: SequenceState, k_scale: torch.Tensor, v_scale: torch.Tensor):
        super().__init__(method, seq)
        self.k_scale, self.v_scale = k_scale, v_scale

    def lazy_initialization(self, key_states, value_states):
        scales = self.k_scale, self.v_scale
        super().lazy_initialization(key_states, value_states)   # which clears them
        self.k_scale, self.v_scale = (s.to(key_states.device) for s in scales)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        fmt = self.method.knobs.formats.kv.name
        kc, vc = fp8.encode(key_states, self.k_scale, fmt), fp8.encode(value_states, self.v_scale, fmt)
        if self.keys is None:
            self.keys, self.values = kc, vc
            return key_states, value_states
        keys = torch.cat([fp8.decode(self.keys, self.k_scale, self.dtype), key_states], dim=-2)
        values = torch.cat([fp8.decode(self.values, self.v_scale, self.dtype), value_states], dim=-2)
        self.keys, self.values = torch.cat([self.keys, kc], -2), torch.cat([self.values, vc], -2)
        return keys, values

    # the scales belong to the layer, not to a token or a sequence: only the codes change
    def crop(self, tokens_to_remove: int) -> None:
        DynamicLayer.crop(self, tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        DynamicLayer.batch_repeat_interleave(self, repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        DynamicLayer.batch_select_indices(self, indices)


def held_bytes_of(layer, seen: set | None = None) -> int:
    """Bytes of the tensors one cache layer holds, each counted once (``seen``: across layers)."""
    seen, total = set() if seen is None else seen, 0
    for t in _tensors(layer):
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


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
    seen: set = set()
    return sum(held_bytes_of(layer, seen) for layer in cache.layers)


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
