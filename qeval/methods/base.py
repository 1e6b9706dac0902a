"""What every method is: a small object built from the run's knobs that the runner only asks.

The runner never branches on a method's name. It asks a method to quantize a weight once, to
quantize an activation on the fly, and to build a KV cache layer (``cache`` semantics) or to
quantize the K/V an attention call is about to use (``simulated`` semantics). The base class
implements all of them as round-to-nearest with the granularities a subclass sets up; KV-only
methods (KIVI, GEAR, H2O) override the KV part and declare ``targets = {"KV"}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.cache_utils import DynamicLayer

from qeval.quant import FULL_PRECISION_BITS, fake_quantize, packed_bytes


@dataclass(frozen=True)
class Granularity:
    """Where min/max statistics are taken: groups of ``group_size`` along ``axis``.

    ``axis=None`` is one group for the whole tensor, or per sequence when ``per_sequence`` is set
    (K/V: a batch never shares statistics, so batched and per-sequence runs agree).
    """

    axis: int | None = -1
    group_size: int | None = None
    per_sequence: bool = False

    def apply(self, x: torch.Tensor, bits: int, symmetric: bool,
              exclude: torch.Tensor | None = None) -> torch.Tensor:
        if bits >= FULL_PRECISION_BITS:
            return x
        if self.per_sequence:
            # (B, ...) -> (B, n): one group per sequence
            ex = None if exclude is None else exclude.expand_as(x).reshape(x.shape[0], -1)
            out = fake_quantize(x.reshape(x.shape[0], -1), bits, -1, None, symmetric, ex)
            return out.reshape(x.shape)
        ex = None if exclude is None else exclude.expand_as(x)
        return fake_quantize(x, bits, self.axis, self.group_size, symmetric, ex)

    def n_groups(self, shape: torch.Size) -> int:
        numel = shape.numel()
        if self.per_sequence:
            return shape[0]
        if self.axis is None:
            return 1
        return numel // (self.group_size or shape[self.axis])


@dataclass
class Bits:
    w: int = 16
    a: int = 16
    k: int = 16
    v: int = 16


@dataclass
class Knobs:
    """The top-level knobs a method reads: bits per target and the group sizes."""

    bits: Bits
    w_group_size: int | None = 128
    a_group_size: int | None = None
    kv_group_size: int | None = None
    kv_semantics: str = "cache"
    backend: str = "torch"        # resolved top-level ``backend``: torch | triton (real low-bit KV)


class Method:
    """Round-to-nearest on every target; subclasses choose the granularities."""

    name: ClassVar[str] = "base"
    targets: ClassVar[frozenset[str]] = frozenset({"W", "WA", "KV"})
    allowed_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8, 16)
    semantics: ClassVar[tuple[str, ...]] = ("cache", "simulated")

    def __init__(self, cfg, knobs: Knobs):
        self.cfg = cfg            # the method's own config node
        self.knobs = knobs
        self.bits = knobs.bits
        self.symmetric = bool(cfg.get("symmetric", False))
        self.w_gran = Granularity()
        self.a_gran = Granularity()
        self.k_gran = Granularity()
        self.v_gran = Granularity()

    @classmethod
    def check(cls, cfg) -> None:
        """Raise ``ConfigError`` for method parameters that cannot work; the base has none."""
        return None

    @classmethod
    def check_model(cls, cfg, linear_widths: set[int], head_dim: int) -> None:
        """Raise ``ConfigError`` for group sizes that do not divide the model's dimensions, read
        from its architecture config before any weight loads; the base groups nothing."""
        return None

    # -- W / WA --------------------------------------------------------------------------------
    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        """(out_features, in_features) -> same, quantized once at load time."""
        return self.w_gran.apply(w, self.bits.w, self.symmetric)

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> same; dynamic, so statistics come from this very input."""
        return self.a_gran.apply(x, self.bits.a, self.symmetric)

    def weight_packed_bytes(self, w: torch.Tensor) -> int:
        return packed_bytes(w.numel(), self.bits.w, None, self.w_gran.n_groups(w.shape),
                            symmetric=self.symmetric)

    # -- KV ------------------------------------------------------------------------------------
    @property
    def quantizes_kv(self) -> bool:
        return min(self.bits.k, self.bits.v) < FULL_PRECISION_BITS

    def quantize_kv(self, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None = None):
        """(B, H_kv, T, D) post-RoPE K/V -> quantized K/V. ``pad``: (B, 1, T, 1) bool, True at
        left-padding positions, which are kept out of the statistics."""
        return (self.k_gran.apply(k, self.bits.k, self.symmetric, pad),
                self.v_gran.apply(v, self.bits.v, self.symmetric, pad))

    def make_cache_layer(self, layer_idx: int, seq: "SequenceState") -> DynamicLayer:
        """One layer of a ``cache``-semantics KV cache."""
        from qeval.kv_cache import StoreQuantizedLayer
        return StoreQuantizedLayer(self, seq)

    def kv_packed_bytes(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Bytes a packed layout of this layer's K/V would need (formula, not a measurement)."""
        return (packed_bytes(keys.numel(), self.bits.k, None, self.k_gran.n_groups(keys.shape),
                             symmetric=self.symmetric)
                + packed_bytes(values.numel(), self.bits.v, None, self.v_gran.n_groups(values.shape),
                               symmetric=self.symmetric))

    def attention_implementation(self, base: str) -> str | None:
        """Name of a registered attention function this method's ``cache`` semantics needs on top
        of ``base`` (sdpa | eager), or None to keep the model's own. H2O uses it to see the
        softmax scores; round-to-nearest methods need none."""
        return None

    def describe(self) -> dict:
        """Method parameters as flat row columns (``method.<name>``)."""
        return {f"method.{k}": v for k, v in self.cfg.items() if k != "name"}


class SequenceState:
    """Per-batch facts a cache layer needs but transformers does not pass: where the padding is."""

    def __init__(self, attention_mask: torch.Tensor | None = None):
        # (B, T_prompt) with 1 = real token, 0 = left padding
        self.attention_mask = attention_mask

    def pad(self, start: int, length: int, batch: int) -> torch.Tensor | None:
        """(B, 1, length, 1) bool mask of padding among positions [start, start + length)."""
        m = self.attention_mask
        if m is None or start >= m.shape[-1]:
            return None
        if m.shape[0] != batch:  # beam search expands the batch before prefill
            m = m.repeat_interleave(batch // m.shape[0], dim=0)
        pad = m[:, start:start + length] == 0
        if pad.shape[-1] < length:  # decode tokens past the prompt are never padding
            pad = torch.cat([pad, pad.new_zeros(batch, length - pad.shape[-1])], -1)
        return pad[:, None, :, None] if pad.any() else None


class RowSelectable(ABC):
    """Mixin for cache layers with per-row state beside K/V (bookkeeping lists, scores, packed
    words): beam reorder, batch expansion and batch selection all become one ``_select_rows(idx)``
    where new row ``i`` is old row ``idx[i]``, so no per-row field can be left behind."""

    @abstractmethod
    def _select_rows(self, idx: torch.Tensor) -> None:
        """Make row ``i`` of every per-row tensor and list old row ``idx[i]``."""

    @abstractmethod
    def _n_rows(self) -> int:
        """The batch rows held."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select_rows(torch.as_tensor(beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(torch.arange(self._n_rows()).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            idx = torch.as_tensor(indices)
            self._select_rows(idx.nonzero().flatten() if idx.dtype == torch.bool else idx)
