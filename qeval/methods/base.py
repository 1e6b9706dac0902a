"""What every method is: a small object built from the run's knobs that the runner only asks.

The runner never branches on a method's name. It asks a method to quantize a weight once, to
quantize an activation on the fly, and to build a KV cache layer (``cache`` semantics) or to
quantize the K/V an attention call is about to use (``simulated`` semantics). It also asks what
the method needs: its own cache (``needs_cache``: it quantizes or evicts K/V), an attention
function (``attention_implementation``), and how its rows are labelled (``labels``). The base
class implements all of it as round-to-nearest with the granularities a subclass sets up; KV-only
methods (KIVI, GEAR) override the KV part and declare ``targets = {"KV"}``; eviction methods
(H2O, StreamingLLM) build on :class:`qeval.methods.eviction.EvictionMethod`.

Names: ``cfg`` is always the whole run config (the class-level checks read it); ``params`` is the
method's own node (``cfg.method``), what an instance is built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.cache_utils import DynamicLayer

from qeval.kv.cache import StoreQuantizedLayer
from qeval.kv.sequence import SequenceState
from qeval.quant.granularity import Granularity
from qeval.quant.primitives import FULL_PRECISION_BITS, packed_bytes


@dataclass
class Bits:
    w: int = 16
    a: int = 16
    k: int = 16
    v: int = 16

    @classmethod
    def from_config(cls, cfg) -> "Bits":
        """The run's bits per target: ``k_bits`` / ``v_bits`` override ``kv_bits`` when set."""
        k = cfg.get("k_bits")
        v = cfg.get("v_bits")
        return cls(cfg.w_bits, cfg.a_bits, cfg.kv_bits if k is None else k, cfg.kv_bits if v is None else v)


def bit_labels(w, a, k, v) -> tuple[str, str]:
    """(target, setting) of a row from its bits: ``fp16`` (nothing quantized), ``W`` (``W4``),
    ``WA`` (``W4A8``), ``KV`` (``KV2``, or ``K4V2`` when they differ), ``mixed`` otherwise."""
    q = {name: b for name, b in (("W", w), ("A", a), ("K", k), ("V", v)) if b is not None and b < 16}
    if not q:
        return "fp16", "fp16"
    if set(q) == {"W"}:
        return "W", f"W{w}"
    if set(q) <= {"W", "A"}:
        return "WA", f"W{w}A{a}"
    if set(q) <= {"K", "V"}:
        return "KV", f"KV{k}" if k == v else f"K{k}V{v}"
    return "mixed", f"W{w}A{a}K{k}V{v}"


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

    # an eviction method drops tokens from its cache (EvictionMethod); a quantizing one keeps them
    evicts: ClassVar[bool] = False

    def __init__(self, params, knobs: Knobs):
        self.params = params      # the method's own config node (cfg.method)
        self.knobs = knobs
        self.bits = knobs.bits
        self.symmetric = bool(params.get("symmetric", False))
        # the zero-point convention (qeval.quant.primitives); a method without the parameter
        # quantizes with the real-valued zero of KIVI and GEAR
        self.zero_point = params.get("zero_point", "real")
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
        return self.w_gran.apply(w, self.bits.w, self.symmetric, zero_point=self.zero_point)

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> same; dynamic, so statistics come from this very input."""
        return self.a_gran.apply(x, self.bits.a, self.symmetric, zero_point=self.zero_point)

    def weight_packed_bytes(self, w: torch.Tensor) -> int:
        return packed_bytes(w.numel(), self.bits.w, None, self.w_gran.n_groups(w.shape),
                            symmetric=self.symmetric)

    # -- KV ------------------------------------------------------------------------------------
    @property
    def quantizes_kv(self) -> bool:
        return min(self.bits.k, self.bits.v) < FULL_PRECISION_BITS

    @property
    def needs_cache(self) -> bool:
        """Whether ``cache`` semantics need this method's own cache: it quantizes or evicts K/V.
        Otherwise a plain ``DynamicCache`` serves (nothing would change)."""
        return self.quantizes_kv or self.evicts

    def quantize_kv(self, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None = None):
        """(B, H_kv, T, D) post-RoPE K/V -> quantized K/V. ``pad``: (B, 1, T, 1) bool, True at
        left-padding positions, which are kept out of the statistics."""
        return (self.k_gran.apply(k, self.bits.k, self.symmetric, pad, self.zero_point),
                self.v_gran.apply(v, self.bits.v, self.symmetric, pad, self.zero_point))

    def make_cache_layer(self, layer_idx: int, seq: SequenceState) -> DynamicLayer:
        """One layer of a ``cache``-semantics KV cache."""
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
        """Method parameters as flat row columns (``method.<name>``), the zero-point convention its
        quantizer used (``zero_point``; None for a method that only evicts), and the row's labels."""
        return ({f"method.{k}": v for k, v in self.params.items() if k != "name"}
                | {"zero_point": None if self.evicts else self.zero_point} | self.labels())

    def labels(self) -> dict:
        """What the report calls this setting: ``target``, ``setting`` and ``kv_budget`` (the
        fraction of the prompt an evicting method keeps; None for a method that keeps every
        token)."""
        b = self.bits
        target, setting = bit_labels(b.w, b.a, b.k, b.v)
        return {"target": target, "setting": setting, "kv_budget": None}
