"""The run's knobs every part reads: bits per target (:class:`Bits`), the number format per target
(:class:`Formats`), group sizes, semantics and backend (:class:`Knobs`), and how a row names its
setting from them (:func:`bit_labels`).

A method is a row of :data:`qeval.methods.METHODS` (:class:`qeval.methods.spec.Spec`); the runner
holds only its parts (:mod:`qeval.methods.parts`), one per target, each built from the method's
row, its own config node and these knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qeval.quant import formats as F


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
    # whether a packed KV cache may decode in its own attention function: the model's attention runs
    # registered functions (BLOOM's, MPT's do not) and no layer has a sliding window (the fused
    # decode attends to every held token); otherwise the cache stays on torch
    fused_decode: bool = True
    w_keep: tuple[int, ...] = ()  # decoder layers whose weights stay in full precision (qeval.model.keep)
