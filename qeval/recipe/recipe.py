"""A run's quantization as the runner sees it: one part per slot, each answering only for its own
target.

The runner, the Linear swap, the caches and the tasks ask a :class:`Recipe`: the weight part
quantizes weights, the act part activations, the kv part keys and values (with the evict part
holding the cache when there is one), and the calibrated parts (transforms first, then the weight
method) run in one calibration stage. A shorthand run (``method=kivi``) is a recipe whose one
choice builds every part its method has, so it computes what it always did.
"""

from __future__ import annotations

from transformers.cache_utils import DynamicLayer

from qeval.errors import ConfigError
from qeval.methods.base import Bits, Formats, bit_labels
from qeval.methods.eviction import FP16_BYTES
from qeval.methods.parts import Calibrated
from qeval.quant.primitives import FULL_PRECISION_BITS
from qeval.recipe.calibration import Chain
from qeval.recipe.slots import ACT, EVICT, KV, SLOTS, TRANSFORM, WEIGHT, Choice


class Recipe:
    def __init__(self, cfg, built: list[tuple[Choice, dict]], bits: Bits, formats: Formats):
        self.cfg = cfg
        self.parts = built      # (choice, {slot: part}) in slot order
        self.bits, self.formats = bits, formats
        slot = {s: p for _, parts in built for s, p in parts.items() if s != TRANSFORM}
        self.weight, self.act = slot.get(WEIGHT), slot.get(ACT)
        self.kv, self.evict = slot.get(KV), slot.get(EVICT)
        self.transforms = [parts[TRANSFORM] for _, parts in built if TRANSFORM in parts]
        # kv_keep_layers resolved against the loaded model (qeval.run.prepare): K/V kept in full precision
        self.keep_kv: frozenset[int] = frozenset()
        if self.evict is not None and self.quantizes_kv:
            # the evicting cache quantizes what it keeps (qeval.kv.aging); validation refused the
            # parts that cannot (qeval.recipe.check), so a reason here is a recipe built without it
            aging = self.kv.aging()
            if isinstance(aging, str):
                raise ConfigError(f"kv={self.kv.spec.name}: with evict={self.evict.spec.name}: {aging}")
            self.evict.aging = aging

    # -- what is active ------------------------------------------------------------------------
    def active(self, choice: Choice) -> bool:
        """Whether a choice changes anything in this run: a slot's bits below 16, or a transform
        before quantized weights or activations (an evict part always evicts)."""
        b = self.bits
        on = {WEIGHT: b.w < FULL_PRECISION_BITS, ACT: b.a < FULL_PRECISION_BITS,
              KV: min(b.k, b.v) < FULL_PRECISION_BITS, EVICT: True,
              TRANSFORM: min(b.w, b.a) < FULL_PRECISION_BITS}
        return any(on[s] for s in choice.slots)

    @property
    def name(self) -> str:
        """The recipe's name in rows and the report: its active choices' methods in slot order
        (``smoothquant+gptq``, ``gptq+kivi``); a shorthand run keeps its method's name."""
        names = [c.name for c, _ in self.parts if self.active(c)]
        names = list(dict.fromkeys(names)) or [c.name for c, _ in self.parts if c.key == "method"][:1]
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

    def packing_parts(self, quantize_input: bool):
        """(weight part, act part or None) whose layout the packed kernels hold: both of one
        method's choice when activations are quantized (the int8 GEMMs quantize them by the
        weight's convention)."""
        from qeval.model.linear import UnsupportedLayout
        if not quantize_input:
            return self.weight, None
        same = any(WEIGHT in c.slots and ACT in c.slots for c, _ in self.parts)
        if not same:
            raise UnsupportedLayout(f"weight={self.weight.spec.name} and act={self.act.spec.name} are different "
                                    "parts: the int8 GEMMs quantize activations by the weight part's convention")
        return self.weight, self.act

    # -- KV ------------------------------------------------------------------------------------
    @property
    def quantizes_kv(self) -> bool:
        return self.kv is not None and min(self.bits.k, self.bits.v) < FULL_PRECISION_BITS

    @property
    def needs_cache(self) -> bool:
        """Whether ``cache`` semantics need the recipe's own cache: it quantizes or evicts K/V.
        Otherwise a plain ``DynamicCache`` serves (nothing would change)."""
        return self.quantizes_kv or self.evict is not None

    @property
    def kv_scales(self):
        return None if self.kv is None else self.kv.kv_scales

    @property
    def kv_backend(self) -> str:
        """Where the KV part's cache runs: ``triton`` (packed words, fused decode) or ``torch``."""
        return (self.kv.columns().get("kv_backend") if self.kv is not None else None) or "torch"

    def quantize_kv(self, k, v, pad=None, layer_idx=None):
        if not self.quantizes_kv or layer_idx in self.keep_kv:
            return k, v
        return self.kv.quantize_kv(k, v, pad, layer_idx)

    def make_cache_layer(self, layer_idx: int, seq):
        if layer_idx in self.keep_kv or (self.evict or self.kv) is None:
            return DynamicLayer()
        return (self.evict or self.kv).make_cache_layer(layer_idx, seq)

    def kv_packed_bytes(self, keys, values) -> int:
        part = self.evict or self.kv
        return (keys.numel() + values.numel()) * FP16_BYTES if part is None else part.kv_packed_bytes(keys, values)

    def attention_implementation(self, base: str) -> str | None:
        part = self.evict or (self.kv if self.quantizes_kv else None)
        return None if part is None else part.attention_implementation(base)

    # -- calibration ---------------------------------------------------------------------------
    def calibrated(self) -> list[tuple[Choice, Calibrated]]:
        """The parts that calibrate in this run, in order (transforms, then the weight method)."""
        return [(c, p) for c, parts in self.parts if self.active(c)
                for p in parts.values() if isinstance(p, Calibrated)]

    @property
    def needs_calibration(self) -> bool:
        return bool(self.calibrated())

    def calibrator(self) -> Chain:
        """What the calibration stage runs: the calibrated parts on one set of samples."""
        return Chain(self.calibrated(), self.cfg)

    def calibration_view(self):
        """The config the calibration stage reads (its samples, a published file): the last
        calibrated part's view."""
        return self.calibrator().view

    # -- rows ----------------------------------------------------------------------------------
    def describe(self) -> dict:
        """Row columns: per slot the method filling it (``weight_method`` ... ``evict_method``,
        ``transforms``; None where the slot is empty or at 16 bits); each choice's knobs under
        its key (``method.*`` for a shorthand run; ``weight.damp``, ``kv.group_size``,
        ``transform.smoothquant.alpha`` for the active choices of a composed one); the formats,
        what each part knows of its own (zero point, scale granularity, KV backend) and the
        labels."""
        row = {f"{slot}_method": None for slot in SLOTS if slot != TRANSFORM} | {"transforms": None}
        transforms = []
        for choice, _ in self.parts:
            if not self.active(choice):
                continue
            for slot in choice.slots:
                if slot == TRANSFORM:
                    transforms.append(choice.name)
                else:
                    row[f"{slot}_method"] = choice.name
        row["transforms"] = ",".join(transforms) or None
        cols: dict = {}
        facts = {"zero_point": None, "kv_scale": None} | {f"{t}_scale_granularity": None for t in ("w", "a", "kv")}
        for choice, parts in self.parts:
            # the knobs of the parts at work (a method left at its default may do nothing)
            if choice.whole or self.active(choice):
                cols |= {f"{choice.key}.{k}": v for k, v in choice.node.items() if k != "name"}
                for part in parts.values():
                    for k, v in part.columns().items():
                        if facts.get(k) is None:   # the first part to quantize names the zero point
                            facts[k] = v
        f = self.formats
        return cols | facts | {"w_format": f.w.name, "a_format": f.a.name, "kv_format": f.kv.name} | self.labels() | row

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
