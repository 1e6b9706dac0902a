"""The combinations a recipe refuses before any model loads, each in one line naming both parts.

A part's own keys are checked by its method on its view of the config (``qeval.validate``); what
is checked here is how parts meet: a quantized target needs a part that quantizes it, an evicting
cache quantizes only with a KV part whose statistics it can keep (:mod:`qeval.kv.aging`), and a
published calibration file belongs to a run with one calibrated part.
"""

from __future__ import annotations

from qeval.errors import ConfigError
from qeval.methods import METHODS
from qeval.methods.base import Bits, Formats
from qeval.methods.parts import Calibrated
from qeval.quant.primitives import FULL_PRECISION_BITS
from qeval.recipe import slots
from qeval.recipe.slots import ACT, EVICT, KV, TRANSFORM, WEIGHT
from qeval.schema import options

WHAT = {WEIGHT: ("w_bits", "weights"), ACT: ("a_bits", "activations"), KV: ("kv_bits", "the KV cache")}


def served(slot: str) -> list[str]:
    """The options a slot's group offers (its files, which tests hold within the methods' ``slots``)."""
    return options(slot)


def _where(part) -> str:
    return f"{part.key}={part.name}" if part.key != "method" else f"method={part.name}"


def check(cfg, built) -> None:
    """``built``: (choice, its parts by slot) pairs of the recipe, as
    :func:`qeval.recipe.build.build_recipe` makes them."""
    chosen = [p for p, _ in built]
    if len(chosen) == 1 and chosen[0].whole:
        return   # a shorthand run: its method's own checks said everything
    bits, formats = Bits.from_config(cfg), Formats.from_config(cfg)
    quantized = {WEIGHT: bits.w < FULL_PRECISION_BITS, ACT: bits.a < FULL_PRECISION_BITS,
                 KV: min(bits.k, bits.v) < FULL_PRECISION_BITS}
    filled = {s for p in chosen for s in p.slots}
    for slot, on in quantized.items():
        if on and slot not in filled:
            key, what = WHAT[slot]
            value = getattr(bits, {"w_bits": "w", "a_bits": "a", "kv_bits": "k"}[key])
            fmt = getattr(formats, {WEIGHT: "w", ACT: "a", KV: "kv"}[slot])
            shown = f"{key}={value}" if fmt.is_integer else f"{slots.SLOT_FORMAT[slot]}={fmt}"
            others = ", ".join(_where(p) for p in chosen)
            raise ConfigError(f"{shown}: no part of this recipe quantizes {what} ({others}); allowed: "
                              f"{slot}=<{'|'.join(served(slot))}>, or {key}=16")
    evict = next(((c, parts[EVICT]) for c, parts in built if EVICT in c.slots), None)
    kv = next(((c, parts[KV]) for c, parts in built if KV in c.slots), None)
    if evict and kv and quantized[KV]:
        _check_aging(cfg, evict, kv)
    calibrated = [(p, m) for p, m in built if any(isinstance(x, Calibrated) for x in m.values()) and (
        (TRANSFORM in p.slots and (quantized[WEIGHT] or quantized[ACT]))
        or any(quantized.get(s, False) for s in p.slots))]
    if len(calibrated) > 1:
        for p, _ in calibrated:
            if p.node.get("scales_file"):
                names = " and ".join(_where(q) for q, _ in calibrated)
                raise ConfigError(f"{p.key if p.key != 'method' else 'method'}.scales_file={p.node.scales_file}: "
                                  f"{names} calibrate together on one set of samples, and a published file "
                                  f"holds one method's result; allowed: null")


def _check_aging(cfg, evict, kv) -> None:
    (ep, em), (kp, km) = evict, kv
    both = f"{_where(ep)} with {_where(kp)}"
    if cfg.get("backend", "auto") == "triton":
        raise ConfigError(f"backend=triton: {both}: the evicting cache holds the tokens it keeps and quantizes "
                          f"them with torch; allowed: backend=torch or backend=auto")
    if cfg.get("kv_scale", "dynamic") != "dynamic":
        raise ConfigError(f"kv_scale={cfg.kv_scale}: {both}: the tokens kept are quantized with scales from "
                          f"their own groups; allowed: dynamic")
    if not em.spec.quantizes_kept:
        keeps = sorted(n for n, c in METHODS.items() if c.evicts and c.quantizes_kept)
        raise ConfigError(f"{_where(ep)}: with {_where(kp)}: its cache does not hold quantized tokens yet; "
                          f"allowed: evict={' or evict='.join(keeps)}, or kv_bits=16")
    if isinstance(problem := km.aging(), str):
        raise ConfigError(f"{_where(kp)}: with {_where(ep)}: {problem}; allowed: kv=kivi, or kv=uniform / "
                          f"kv=group with per-token statistics")
