"""The parts a recipe is made of, one protocol per target: each part answers only for its own.

| part           | asked by                        | answers                                                |
| -------------- | ------------------------------- | ------------------------------------------------------ |
| :class:`WeightPart` | the Linear swap, once per weight | ``quantize_weight``, ``store_weight``, ``weight_packed_bytes`` |
| :class:`ActPart`    | each quantized Linear's forward  | ``quantize_activation``                                 |
| :class:`KVPart`     | the cache and attention          | ``quantize_kv``, ``make_cache_layer``, ``kv_packed_bytes``, ``aging``, ``attention_implementation`` |
| :class:`EvictPart`  | the cache and attention (:mod:`qeval.methods.eviction`) | ``make_cache_layer``, ``budget``, ``labels`` ... |
| :class:`TransformPart` | the calibration stage         | ``calibrate``, ``apply_calibration``                     |

Every part is built from its method's row (``spec``, :class:`qeval.methods.spec.Spec`), its own
config node (``params``) and the run's knobs (``knobs``: bits, group sizes, formats, backend), and
gives the row the facts only it knows (``columns``: its zero point, where its scales sit). A part
that calibrates (GPTQ's and AWQ's weights, SmoothQuant's transform) is also :class:`Calibrated`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Part:
    def __init__(self, spec, params, knobs):
        self.spec = spec          # the method's row in the table
        self.params = params      # the part's own config node
        self.knobs = knobs        # the run's bits, group sizes, formats, backend (qeval.methods.base.Knobs)

    def columns(self) -> dict:
        """Row facts only this part knows (``zero_point``, ``<target>_scale_granularity`` ...)."""
        return {}


class Calibrated(ABC):
    """A part that computes something from calibration data between model load and the Linear swap
    (:mod:`qeval.calibration`)."""

    @abstractmethod
    def calibrate(self, model, samples: list[torch.Tensor]) -> dict:
        """Compute the result from ``samples`` ((1, T) token ids each) and leave ``model`` exactly
        as :meth:`apply_calibration` of that result would; returns the result (tensors, lists,
        strings: what ``torch.save`` keeps)."""

    @abstractmethod
    def apply_calibration(self, model, result: dict) -> None:
        """Apply a (saved or published) result of :meth:`calibrate` to a freshly loaded ``model``."""


class WeightPart(Part, ABC):
    @abstractmethod
    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        """(out_features, in_features) -> same, quantized once at load time."""

    def store_weight(self, w: torch.Tensor):
        """(float8 codes, float32 scale) to hold where torch has the weight format's dtype, equal
        to :meth:`quantize_weight` once decoded; None: the weight is held as computed."""
        return None

    @abstractmethod
    def weight_packed_bytes(self, w: torch.Tensor) -> int:
        """Bytes a packed layout of ``w`` needs (formula, not a measurement)."""


class ActPart(Part, ABC):
    @abstractmethod
    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> same; dynamic, so statistics come from this very input."""


class KVPart(Part, ABC):
    # kv_scale=static: FP8 K/V scales fixed per layer (qeval.calibration.kv_scales.KVScales), set
    # by the run once calibrated; None while K/V scales are dynamic (or not yet calibrated)
    kv_scales = None

    @abstractmethod
    def quantize_kv(self, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None = None,
                    layer_idx: int | None = None):
        """(B, H_kv, T, D) post-RoPE K/V -> quantized K/V (``simulated`` semantics). ``pad``: (B, 1,
        T, 1) bool, True at left-padding positions, kept out of the statistics; ``layer_idx``: the
        layer, for static scales."""

    @abstractmethod
    def make_cache_layer(self, layer_idx: int, seq):
        """One layer of this part's ``cache``-semantics KV cache."""

    @abstractmethod
    def kv_packed_bytes(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Bytes a packed layout of this layer's K/V would need (formula, not a measurement)."""

    @abstractmethod
    def aging(self):
        """How an evicting cache quantizes the tokens it keeps with this part
        (:class:`qeval.kv.aging.Aging`), or why it cannot (a one-line reason, str)."""

    def attention_implementation(self, base: str) -> str | None:
        """Name of a registered attention function this part's cache needs on top of ``base``
        (sdpa | eager), or None to keep the model's own."""
        return None


class TransformPart(Part, Calibrated, ABC):
    """Changes the model before anything is quantized (SmoothQuant's smoothing), from calibration."""
