"""A run's quantization as the runner sees it: one part per slot, each a method object that
answers only for its own targets.

The runner, the Linear swap, the caches and the tasks ask a :class:`Recipe` what they asked the
single method before: the weight part quantizes weights, the act part activations, the kv part
keys and values (with the evict part holding the cache when there is one), and the calibrated
parts (transforms first, then the weight method) run in one calibration stage. A shorthand run
(``method=kivi``) is a recipe whose one part fills every slot, so it computes what it always did.
"""

from __future__ import annotations

from transformers.cache_utils import DynamicLayer

from qeval.methods.base import Bits, Formats, Method, bit_labels
from qeval.quant.primitives import FULL_PRECISION_BITS
from qeval.recipe.calibration import Chain
from qeval.recipe.slots import ACT, EVICT, KV, SLOTS, TRANSFORM, WEIGHT, Part


class Recipe:
    def __init__(self, cfg, built: list[tuple[Part, Method]], bits: Bits, formats: Formats):
        self.cfg = cfg
        self.parts = built
        self.bits, self.formats = bits, formats
        slot = {s: m for part, m in built for s in part.slots if s != TRANSFORM}
        self.weight, self.act = slot.get(WEIGHT), slot.get(ACT)
        self.kv, self.evict = slot.get(KV), slot.get(EVICT)
        self.transforms = [m for part, m in built if TRANSFORM in part.slots]
        # kv_keep_layers resolved against the loaded model (qeval.run.prepare): K/V kept in full precision
        self.keep_kv: frozenset[int] = frozenset()
        if self.evict is not None and self.kv is not None and self.kv.quantizes_kv:
            self.evict.aging = self.kv.aging_rules()   # the evicting cache quantizes what it keeps (qeval.kv.aging)

    # -- what is active ------------------------------------------------------------------------
    def active(self, part: Part) -> bool:
        """Whether a part changes anything in this run: a slot's bits below 16, or a transform
        before quantized weights or activations (an evict part always evicts)."""
        b = self.bits
        on = {WEIGHT: b.w < FULL_PRECISION_BITS, ACT: b.a < FULL_PRECISION_BITS,
              KV: min(b.k, b.v) < FULL_PRECISION_BITS, EVICT: True,
              TRANSFORM: min(b.w, b.a) < FULL_PRECISION_BITS}
        return any(on[s] for s in part.slots)

    @property
    def name(self) -> str:
        """The recipe's name in rows and the report: its active parts' methods in slot order
        (``smoothquant+gptq``, ``gptq+kivi``); a shorthand run keeps its method's name."""
        names = [p.name for p, _ in self.parts if self.active(p)]
        names = list(dict.fromkeys(names)) or [p.name for p, _ in self.parts if p.key == "method"][:1]
        return "+".join(names) or self.parts[0][0].name

    # -- W / A ---------------------------------------------------------------------------------
    def quantize_weight(self, w):
        return w if self.weight is None else self.weight.quantize_weight(w)

    def quantize_activation(self, x):
        return x if self.act is None else self.act.quantize_activation(x)

    def store_weight(self, w):
        return None if self.weight is None else self.weight.store_weight(w)

    def weight_packed_bytes(self, w) -> int:
        return self.weight.weight_packed_bytes(w)

    def packing_part(self, quantize_input: bool):
        """The part whose layout the packed kernels hold: the weight part, which must also be the
        act part when activations are quantized (the int8 GEMMs quantize them by its convention)."""
        from qeval.model.linear import UnsupportedLayout
        if quantize_input and self.act is not self.weight:
            raise UnsupportedLayout(f"weight={self.weight.name} and act={self.act.name} are different parts: the "
                                    "int8 GEMMs quantize activations by the weight part's convention")
        return self.weight

    # -- KV ------------------------------------------------------------------------------------
    @property
    def quantizes_kv(self) -> bool:
        return self.kv is not None and self.kv.quantizes_kv

    @property
    def needs_cache(self) -> bool:
        return self.quantizes_kv or self.evict is not None

    @property
    def kv_scales(self):
        return None if self.kv is None else self.kv.kv_scales

    def quantize_kv(self, k, v, pad=None, layer_idx=None):
        if not self.quantizes_kv or layer_idx in self.keep_kv:
            return k, v
        if self.kv.kv_scales is not None:   # static scales are per layer
            return self.kv.quantize_kv(k, v, pad, layer_idx)
        return self.kv.quantize_kv(k, v, pad)

    def make_cache_layer(self, layer_idx: int, seq):
        if layer_idx in self.keep_kv:
            return DynamicLayer()
        return (self.evict or self.kv).make_cache_layer(layer_idx, seq)

    def kv_packed_bytes(self, keys, values) -> int:
        # no KV part: the first part's formula at 16 bits, as a shorthand run's one method gives it
        return (self.evict or self.kv or self.parts[0][1]).kv_packed_bytes(keys, values)

    def attention_implementation(self, base: str) -> str | None:
        part = self.evict or (self.kv if self.quantizes_kv else None)
        return None if part is None else part.attention_implementation(base)

    # -- calibration ---------------------------------------------------------------------------
    def calibrated(self) -> list[tuple[Part, Method]]:
        """The parts that calibrate in this run, in order (transforms, then the weight method),
        each once (a shorthand's one method fills several slots)."""
        seen, out = set(), []
        for part, m in self.parts:
            if m.calibrates and self.active(part) and id(m) not in seen:
                seen.add(id(m))
                out.append((part, m))
        return out

    @property
    def needs_calibration(self) -> bool:
        return any(m.needs_calibration for _, m in self.calibrated())

    def calibrator(self):
        """What the calibration stage runs: the one calibrated part, or a :class:`Chain` of them
        on one set of samples."""
        parts = self.calibrated()
        return parts[0][1] if len(parts) == 1 else Chain(parts, self.cfg)

    def calibration_view(self):
        """The config the calibration stage reads (its samples, a published file): the one
        calibrated part's view, or the chain's last part's."""
        parts = self.calibrated()
        return parts[0][0].view(self.cfg) if len(parts) == 1 else Chain(parts, self.cfg).view

    # -- rows ----------------------------------------------------------------------------------
    def describe(self) -> dict:
        """Row columns: the shorthand method's own (``method.*``, formats, scale granularities,
        labels) as before; per slot the method filling it (``weight_method`` ... ``evict_method``,
        ``transforms``; None where the slot is empty or at 16 bits); each chosen part's knobs
        under its key (``weight.damp``, ``kv.group_size``, ``transform.smoothquant.alpha``)."""
        row = {f"{slot}_method": None for slot in SLOTS if slot != TRANSFORM} | {"transforms": None}
        transforms = []
        for part, m in self.parts:
            if not self.active(part):
                continue
            for slot in part.slots:
                if slot == TRANSFORM:
                    transforms.append(part.name)
                else:
                    row[f"{slot}_method"] = part.name
        row["transforms"] = ",".join(transforms) or None
        if len(self.parts) == 1:
            return self.parts[0][1].describe() | row
        return self._composed() | row

    def _composed(self) -> dict:
        cols: dict = {}
        for part, m in self.parts:   # the knobs of the parts at work (a method left at its default may do nothing)
            if self.active(part):
                cols |= {f"{part.key}.{k}": v for k, v in m.params.items() if k != "name"}
        first = next((m for p, m in self.parts if self.active(p) and not m.evicts), None)
        by_target = {"w": self.weight, "a": self.act, "kv": self.kv}
        cols |= {"zero_point": None if first is None else first.zero_point,
                 "w_format": self.formats.w, "a_format": self.formats.a, "kv_format": self.formats.kv,
                 "kv_scale": None if self.kv is None else self.kv.describe().get("kv_scale")}
        cols |= {f"{t}_scale_granularity": None if m is None else m.scale_granularity(t)
                 for t, m in by_target.items()}
        if self.kv is not None and "kv_backend" in (d := self.kv.describe()):
            cols["kv_backend"] = d["kv_backend"]
        return cols | self.labels()

    def labels(self) -> dict:
        """``target`` and ``setting`` from the bits (``mixed``, ``W4A16K2V2``), with an evicting
        part's budget after them (``KV2 20%``) and its ``kv_budget``."""
        b = self.bits
        target, setting = bit_labels(b.w, b.a, b.k, b.v, self.formats)
        if self.evict is None:
            return {"target": target, "setting": setting, "kv_budget": None}
        kept = self.evict.labels()
        if target == "fp16":
            return kept
        return {"target": f"{target}+evict", "setting": f"{setting} {kept['setting'].removeprefix('KV ')}",
                "kv_budget": kept["kv_budget"]}
