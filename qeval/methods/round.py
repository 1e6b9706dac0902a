"""Round-to-nearest parts: a weight, an activation and a KV part, each holding the
:class:`~qeval.quant.rounding.Rounding` of the tensors it quantizes. ``method=uniform`` and
``method=group`` are these three with their own granularities; SmoothQuant's weights and
activations and AWQ's weights are round-to-nearest too.

Number formats (``w_format``, ``a_format``, ``kv_format``; :mod:`qeval.quant.formats`) are
orthogonal to the part: FP8 takes one scale per group, MX and NVFP4 bring their own blocks.
"""

from __future__ import annotations

import torch

from qeval.kv.cache import FP8StoredLayer, StaticFP8Layer, StoreQuantizedLayer
from qeval.methods.parts import ActPart, KVPart, WeightPart
from qeval.quant.granularity import Granularity
from qeval.quant.rounding import Rounding


def rounding(params, knobs, target: str, bits: int, gran: Granularity) -> Rounding:
    """``target``'s rounding from a part's node (``symmetric``, ``zero_point``: a node without the
    parameter quantizes with the real-valued zero of KIVI and GEAR) and the run's format."""
    return Rounding(target, bits, gran, getattr(knobs.formats, target), bool(params.get("symmetric", False)),
                    params.get("zero_point", "real"))


class RoundWeight(WeightPart):
    def __init__(self, spec, params, knobs, gran: Granularity):
        super().__init__(spec, params, knobs)
        self.rounding = rounding(params, knobs, "w", knobs.bits.w, gran)

    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.rounding(w)

    def store_weight(self, w: torch.Tensor):
        r = self.rounding
        return r.encode_fp8(w) if r.quantizes and r.fmt.stored else None

    def weight_packed_bytes(self, w: torch.Tensor) -> int:
        return self.rounding.packed_bytes(w.shape)

    def columns(self) -> dict:
        return {"zero_point": self.rounding.zero_point, "w_scale_granularity": self.rounding.scale_label()}


class RoundAct(ActPart):
    def __init__(self, spec, params, knobs, gran: Granularity):
        super().__init__(spec, params, knobs)
        self.rounding = rounding(params, knobs, "a", knobs.bits.a, gran)

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.rounding(x)

    def columns(self) -> dict:
        return {"zero_point": self.rounding.zero_point, "a_scale_granularity": self.rounding.scale_label()}


class RoundKV(KVPart):
    """Keys and values in one granularity; FP8 K/V held as float8 in ``cache`` semantics where
    torch has the format's dtype and both are quantized (:class:`qeval.kv.cache.FP8StoredLayer`)."""

    def __init__(self, spec, params, knobs, gran: Granularity):
        super().__init__(spec, params, knobs)
        self.k_rounding = rounding(params, knobs, "kv", knobs.bits.k, gran)
        self.v_rounding = rounding(params, knobs, "kv", knobs.bits.v, gran)

    def quantize_kv(self, k, v, pad=None, layer_idx=None):
        if self.kv_scales is not None:   # static scales: the layer's own replace every statistic
            return self.kv_scales.fake_quantize(layer_idx, k, v)
        return self.k_rounding(k, pad), self.v_rounding(v, pad)

    def make_cache_layer(self, layer_idx, seq):
        k, v = self.k_rounding, self.v_rounding
        if k.fmt.stored and k.quantizes and v.quantizes:
            if self.kv_scales is not None:
                return StaticFP8Layer(self, seq, *self.kv_scales.layer(layer_idx))
            if self.knobs.kv_scale != "dynamic":
                raise RuntimeError(f"kv_scale={self.knobs.kv_scale}: the K/V scales were never calibrated")
            return FP8StoredLayer(self, seq)
        return StoreQuantizedLayer(self, seq)

    def kv_packed_bytes(self, keys, values) -> int:
        return self.k_rounding.packed_bytes(keys.shape) + self.v_rounding.packed_bytes(values.shape)

    def aging(self):
        """Per token, when stored, as this part's own cache does; refused where statistics span
        tokens (per channel, per tensor), since only one token's survive the eviction of others."""
        from qeval.kv.aging import Aging, Rule
        k, v = self.k_rounding, self.v_rounding
        g = k.gran
        if k.fmt.block is None and (g.per_sequence or g.axis != -1):
            return f"its {self._scale_label()} statistics span tokens the cache may evict"
        return Aging(*(Rule(0, 1, r, r.packed_bytes) for r in (k, v)))

    def _scale_label(self) -> str | None:
        k, v = self.k_rounding, self.v_rounding
        quantized = k if k.quantizes else v
        if quantized.quantizes and self.knobs.kv_scale != "dynamic" and k.fmt.block is None:
            return f"static {'per_head' if self.knobs.kv_scale == 'static_per_head' else 'per_tensor'} fp32"
        return quantized.scale_label()

    def columns(self) -> dict:
        k, v = self.k_rounding, self.v_rounding
        # FP8 K/V: scales from each K/V (dynamic) or fixed by calibration (static)
        return {"zero_point": k.zero_point, "kv_scale_granularity": self._scale_label(),
                "kv_scale": self.knobs.kv_scale if k.fmt.stored and min(k.bits, v.bits) < 16 else None}
