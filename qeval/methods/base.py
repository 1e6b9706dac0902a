"""What every method is: a small object built from the run's knobs that the runner only asks.

The runner never branches on a method's name. It asks a method to quantize a weight once, to
quantize an activation on the fly, and to build a KV cache layer (``cache`` semantics) or to
quantize the K/V an attention call is about to use (``simulated`` semantics). It also asks what
the method needs: its own cache (``needs_cache``: it quantizes or evicts K/V), an attention
function (``attention_implementation``), and how its rows are labelled (``labels``). The base
class implements all of it as round-to-nearest with the granularities a subclass sets up; KV-only
methods (KIVI, GEAR) override the KV part and declare ``targets = {"KV"}``; eviction methods
(H2O, StreamingLLM) build on :class:`qeval.methods.eviction.EvictionMethod`.

Number formats (``w_format``, ``a_format``, ``kv_format``; :mod:`qeval.quant.formats`) are
orthogonal to the method: the base quantizers dispatch on them, FP8 with the method's groups, the
block formats with their own blocks. A method lists the formats it can run in ``allowed_formats``
(integers only unless it says otherwise, since a method with its own quantizer is integer).

Names: ``cfg`` is always the whole run config (the class-level checks read it); ``params`` is the
method's own node (``cfg.method``), what an instance is built from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers.cache_utils import DynamicLayer

from qeval.kv.cache import FP8StoredLayer, StaticFP8Layer, StoreQuantizedLayer
from qeval.kv.sequence import SequenceState
from qeval.quant import formats as F
from qeval.quant.formats import fp8
from qeval.quant.granularity import Granularity
from qeval.quant.primitives import FULL_PRECISION_BITS, packed_bytes


@dataclass(frozen=True)
class Formats:
    """The number format per target (:class:`qeval.quant.formats.Format`; a name is looked up)."""

    w: F.Format = F.INT
    a: F.Format = F.INT
    kv: F.Format = F.INT

    def __post_init__(self):
        for target in ("w", "a", "kv"):
            object.__setattr__(self, target, F.lookup(getattr(self, target)))

    @classmethod
    def from_config(cls, cfg) -> Formats:
        return cls(*(cfg.get(key) or F.INT for key in ("w_format", "a_format", "kv_format")))

    def names(self) -> dict[str, str]:
        return {"w": self.w.name, "a": self.a.name, "kv": self.kv.name}


@dataclass
class Bits:
    w: int = 16
    a: int = 16
    k: int = 16
    v: int = 16

    @classmethod
    def from_config(cls, cfg) -> "Bits":
        """The run's bits per element per target: ``k_bits`` / ``v_bits`` override ``kv_bits`` when
        set, and a non-integer ``*_format`` sets its own width (``*_bits`` is then 16 or that width,
        which validation checks)."""
        k = cfg.get("k_bits")
        v = cfg.get("v_bits")
        f = Formats.from_config(cfg)
        k, v = cfg.kv_bits if k is None else k, cfg.kv_bits if v is None else v
        return cls(*(fmt.width(b) for b, fmt in ((cfg.w_bits, f.w), (cfg.a_bits, f.a), (k, f.kv), (v, f.kv))))


def bit_labels(w, a, k, v, formats: Formats | None = None) -> tuple[str, str]:
    """(target, setting) of a row from its bits: ``fp16`` (nothing quantized), ``W`` (``W4``),
    ``WA`` (``W4A8``), ``KV`` (``KV2``, or ``K4V2`` when they differ), ``mixed`` otherwise. A
    non-integer format is named instead of its bits, spaced: ``W mxfp4``, ``KV fp8_e4m3``,
    ``W nvfp4 A nvfp4``, ``W4 KV fp8_e4m3`` (a mixed setting with a format names only its
    quantized targets)."""
    q = {name: b for name, b in (("W", w), ("A", a), ("K", k), ("V", v)) if b is not None and b < 16}
    if not q:
        return "fp16", "fp16"
    f = formats or Formats()
    target = ("W" if set(q) == {"W"} else "WA" if set(q) <= {"W", "A"} else "KV" if set(q) <= {"K", "V"}
              else "mixed")
    if f.w.is_integer and f.a.is_integer and f.kv.is_integer:
        return target, {"W": f"W{w}", "WA": f"W{w}A{a}", "KV": f"KV{k}" if k == v else f"K{k}V{v}",
                        "mixed": f"W{w}A{a}K{k}V{v}"}[target]
    parts = {"W": f.w.setting("W", w), "A": f.a.setting("A", a),
             "KV": f.kv.setting("KV", k) if not f.kv.is_integer or k == v else f"K{k}V{v}"}
    # a mixed setting names only its quantized targets: ``W4 KV fp8_e4m3``
    quantized = {"W": "W" in q, "A": "A" in q, "KV": bool(q.keys() & {"K", "V"})}
    wanted = {"W": ["W"], "WA": ["W", "A"], "KV": ["KV"],
              "mixed": [n for n in ("W", "A", "KV") if quantized[n]]}[target]
    return target, " ".join(parts[n] for n in wanted)


@dataclass
class Knobs:
    """The top-level knobs a method reads: bits per target and the group sizes."""

    bits: Bits
    w_group_size: int | None = 128
    a_group_size: int | None = None
    kv_group_size: int | None = None
    kv_semantics: str = "cache"
    backend: str = "torch"        # resolved top-level ``backend``: torch | triton (real low-bit KV)
    formats: Formats = field(default_factory=Formats)
    kv_scale: str = "dynamic"     # FP8 K/V scales: dynamic | static | static_per_head (per layer, calibrated)
    # whether the model's attention runs registered attention functions (Falcon's, MPT's, BLOOM's
    # do not): packed KV layers decode in one, so without it their cache stays on torch
    registered_attention: bool = True
    w_keep: tuple[int, ...] = ()  # decoder layers whose weights stay in full precision (qeval.model.keep)


class Method:
    """Round-to-nearest on every target; subclasses choose the granularities."""

    name: ClassVar[str] = "base"
    targets: ClassVar[frozenset[str]] = frozenset({"W", "WA", "KV"})
    # the recipe slots (qeval.recipe.slot_names) it fills as the run's ``method=``
    slots: ClassVar[tuple[str, ...]] = ()
    allowed_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8, 16)
    semantics: ClassVar[tuple[str, ...]] = ("cache", "simulated")
    # number formats it runs (qeval.quant.formats); a method with its own quantizer is integer
    allowed_formats: ClassVar[tuple[F.Format, ...]] = (F.INT,)

    # an eviction method drops tokens from its cache (EvictionMethod); a quantizing one keeps them
    evicts: ClassVar[bool] = False
    # a calibrated method (GPTQ, SmoothQuant, AWQ) computes something from calibration data between
    # model load and the Linear swap (qeval.calibration); its YAML's ``calibration`` key names the
    # preset (qeval/configs/calibration/) that ``calibration=auto`` resolves to
    calibrates: ClassVar[bool] = False
    # kv_scale=static: FP8 K/V scales fixed per layer (qeval.calibration.kv_scales.KVScales), set
    # by the run once calibrated; None while K/V scales are dynamic (or not yet calibrated)
    kv_scales = None

    def __init__(self, params, knobs: Knobs):
        self.params = params      # the method's own config node (cfg.method)
        self.knobs = knobs
        self.bits = knobs.bits
        self.formats = knobs.formats
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

    @classmethod
    def check_architecture(cls, cfg, arch) -> None:
        """Raise ``ConfigError`` for a model architecture (its config, before any weight loads) the
        method cannot handle; the base handles every one."""
        return None

    # -- calibration (only where ``calibrates``) -----------------------------------------------
    @classmethod
    def calibration_identity(cls, cfg) -> dict:
        """What a calibration result depends on besides the model and the data; saved results are
        reused under the hash of it (qeval.calibration.store). By default: the method's parameters,
        bits, group sizes and formats."""
        b = Bits.from_config(cfg)
        return {"method": {k: cfg.method[k] for k in cfg.method}, "w_bits": b.w, "a_bits": b.a,
                "w_group_size": cfg.w_group_size, "a_group_size": cfg.a_group_size,
                "formats": Formats.from_config(cfg).names()}

    @property
    def needs_calibration(self) -> bool:
        """Whether the run calibrates before the Linear swap: a calibrated method quantizing W or A."""
        return self.calibrates and min(self.bits.w, self.bits.a) < FULL_PRECISION_BITS

    def calibrate(self, model, samples: list[torch.Tensor]) -> dict:
        """Compute the method's result from ``samples`` ((1, T) token ids each) and leave ``model``
        exactly as :meth:`apply_calibration` of that result would; returns the result (tensors,
        lists, strings: what ``torch.save`` keeps)."""
        raise NotImplementedError(f"method {self.name} does not calibrate")

    def apply_calibration(self, model, result: dict) -> None:
        """Apply a (saved) result of :meth:`calibrate` to a freshly loaded ``model``."""
        raise NotImplementedError(f"method {self.name} does not calibrate")

    def _quantize(self, x, target: str, bits: int, gran: Granularity, exclude=None) -> torch.Tensor:
        """Round-to-nearest in ``target``'s (w | a | kv) format: integers or FP8 in ``gran``'s
        groups, a block format in its own blocks; the identity at 16 bits."""
        if bits >= FULL_PRECISION_BITS:
            return x
        return getattr(self.formats, target).fake_quantize(x, target, bits, gran, self.symmetric, exclude,
                                                           self.zero_point)

    def _packed_bytes(self, shape: torch.Size, target: str, bits: int, gran: Granularity) -> int:
        fmt = F.INT if bits >= FULL_PRECISION_BITS else getattr(self.formats, target)
        return fmt.packed_bytes(shape, target, bits, gran, self.symmetric)

    # -- W / WA --------------------------------------------------------------------------------
    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        """(out_features, in_features) -> same, quantized once at load time."""
        return self._quantize(w, "w", self.bits.w, self.w_gran)

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> same; dynamic, so statistics come from this very input."""
        return self._quantize(x, "a", self.bits.a, self.a_gran)

    def store_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(float8 codes, float32 scale) to hold where torch has the weight format's dtype, so that
        ``fp8.decode(codes, scale, w.dtype)`` equals :meth:`quantize_weight`; None otherwise."""
        if self.bits.w >= FULL_PRECISION_BITS or not self.formats.w.stored:
            return None
        return self.w_gran.encode_fp8(w, self.formats.w.name)

    def weight_packed_bytes(self, w: torch.Tensor) -> int:
        return self._packed_bytes(w.shape, "w", self.bits.w, self.w_gran)

    # -- KV ------------------------------------------------------------------------------------
    @property
    def quantizes_kv(self) -> bool:
        return min(self.bits.k, self.bits.v) < FULL_PRECISION_BITS

    @property
    def needs_cache(self) -> bool:
        """Whether ``cache`` semantics need this method's own cache: it quantizes or evicts K/V.
        Otherwise a plain ``DynamicCache`` serves (nothing would change)."""
        return self.quantizes_kv or self.evicts

    def quantize_kv(self, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None = None,
                    layer_idx: int | None = None):
        """(B, H_kv, T, D) post-RoPE K/V -> quantized K/V. ``pad``: (B, 1, T, 1) bool, True at
        left-padding positions, which are kept out of the statistics. With static scales the
        layer's own (``layer_idx``, which must then be given) replace every statistic."""
        if self.kv_scales is not None:
            return self.kv_scales.fake_quantize(layer_idx, k, v)
        return (self._quantize(k, "kv", self.bits.k, self.k_gran, pad),
                self._quantize(v, "kv", self.bits.v, self.v_gran, pad))

    def encode_kv(self, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None = None):
        """``cache`` storage of an FP8 ``kv_format``: ((k codes, k scale), (v codes, v scale)),
        float8 codes (B, H, T, D) and float32 scales (B, H or 1, T, n) that
        :func:`qeval.quant.formats.fp8.decode` turns into exactly what :meth:`quantize_kv` gives."""
        def enc(x, gran):
            codes, scale = gran.encode_fp8(x, self.formats.kv.name, pad)
            # a per-sequence scale (B, 1, 1, 1) is held once per token, so chunks concatenate on T
            return codes, scale.expand(*scale.shape[:2], x.shape[-2], scale.shape[-1]).contiguous()
        return enc(k, self.k_gran), enc(v, self.v_gran)

    def make_cache_layer(self, layer_idx: int, seq: SequenceState) -> DynamicLayer:
        """One layer of a ``cache``-semantics KV cache: FP8 K/V held as float8 where the format has
        a torch dtype and both are quantized, otherwise fake-quantized in the model's dtype."""
        if self.formats.kv.stored and max(self.bits.k, self.bits.v) < FULL_PRECISION_BITS:
            if self.kv_scales is not None:
                return StaticFP8Layer(self, seq, *self.kv_scales.layer(layer_idx))
            if self.knobs.kv_scale != "dynamic":
                raise RuntimeError(f"kv_scale={self.knobs.kv_scale}: the K/V scales were never calibrated")
            return FP8StoredLayer(self, seq)
        return StoreQuantizedLayer(self, seq)

    def kv_packed_bytes(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Bytes a packed layout of this layer's K/V would need (formula, not a measurement)."""
        return (self._packed_bytes(keys.shape, "kv", self.bits.k, self.k_gran)
                + self._packed_bytes(values.shape, "kv", self.bits.v, self.v_gran))

    def aging_rules(self):
        """How an evicting cache quantizes the tokens it keeps with this method
        (:mod:`qeval.kv.aging`): per token, when stored, as this method's own cache does."""
        from qeval.kv.aging import Aging, Rule

        def rule(bits, gran):
            return Rule(0, 1, lambda x, exclude: self._quantize(x, "kv", bits, gran, exclude),
                        lambda shape: self._packed_bytes(shape, "kv", bits, gran))
        return Aging(rule(self.bits.k, self.k_gran), rule(self.bits.v, self.v_gran))

    def aging_problem(self) -> str | None:
        """Why an evicting cache cannot quantize its kept tokens with this method, or None: only
        statistics of one token survive the eviction of others."""
        if self.formats.kv.block is not None:   # its own blocks along head_dim: per token
            return None
        if self.k_gran.per_sequence or self.k_gran.axis != -1 or self.v_gran.per_sequence or self.v_gran.axis != -1:
            return f"its {self.scale_granularity('kv')} statistics span tokens the cache may evict"
        return None

    def attention_implementation(self, base: str) -> str | None:
        """Name of a registered attention function this method's ``cache`` semantics needs on top
        of ``base`` (sdpa | eager), or None to keep the model's own. H2O uses it to see the
        softmax scores; round-to-nearest methods need none."""
        return None

    def scale_granularity(self, target: str) -> str | None:
        """Where ``target``'s (w | a | kv) scales sit, for the row: a block format's own blocks
        (``block32 e8m0``), else the base quantizer's groups (``per_channel``, ``per_token``,
        ``per_tensor``, ``group128``), with ``fp32`` appended for FP8's float32 scales. None when
        the target is not quantized or the method quantizes it with its own code (KIVI, GEAR)."""
        fmt = getattr(self.formats, target)
        b, gran, own = {"w": (self.bits.w, self.w_gran, "quantize_weight"),
                        "a": (self.bits.a, self.a_gran, "quantize_activation"),
                        "kv": (min(self.bits.k, self.bits.v), self.k_gran, "quantize_kv")}[target]
        if b >= FULL_PRECISION_BITS or getattr(type(self), own) is not getattr(Method, own):
            return None
        if target == "kv" and self.knobs.kv_scale != "dynamic" and fmt.block is None:
            return f"static {'per_head' if self.knobs.kv_scale == 'static_per_head' else 'per_tensor'} fp32"
        label = (f"group{gran.group_size}" if gran.group_size else "per_tensor" if gran.per_sequence
                 or gran.axis is None else "per_channel" if target == "w" or gran.axis != -1 else "per_token")
        return fmt.scale_label(target, label)

    def describe(self) -> dict:
        """Method parameters as flat row columns (``method.<name>``), the zero-point convention its
        quantizer used (``zero_point``; None for a method that only evicts), the number format and
        scale granularity per target, and the row's labels."""
        f = self.formats
        return ({f"method.{k}": v for k, v in self.params.items() if k != "name"}
                | {"zero_point": None if self.evicts else self.zero_point,
                   "w_format": f.w.name, "a_format": f.a.name, "kv_format": f.kv.name,
                   # FP8 K/V: scales from each K/V (dynamic) or fixed by calibration (static)
                   "kv_scale": self.knobs.kv_scale if f.kv.stored and self.quantizes_kv else None}
                | {f"{t}_scale_granularity": self.scale_granularity(t) for t in ("w", "a", "kv")}
                | self.labels())

    def labels(self) -> dict:
        """What the report calls this setting: ``target``, ``setting`` and ``kv_budget`` (the
        fraction of the prompt an evicting method keeps; None for a method that keeps every
        token)."""
        b = self.bits
        target, setting = bit_labels(b.w, b.a, b.k, b.v, self.formats)
        return {"target": target, "setting": setting, "kv_budget": None}
