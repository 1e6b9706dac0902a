"""The run's :class:`~qeval.recipe.recipe.Recipe` from its config: each chosen part built as its
method from its own view of the config (:meth:`qeval.recipe.slots.Choice.view`)."""

from __future__ import annotations

from omegaconf import open_dict

from qeval.methods.base import Bits, Formats
from qeval.methods.build import build_parts
from qeval.recipe import slots
from qeval.recipe.recipe import Recipe


def part_views(cfg):
    """(part, its view of ``cfg``) for every chosen part. Under an evict part, the kv part keeps
    its cache on torch: the evicting layer holds the tokens and quantizes them there
    (:mod:`qeval.kv.aging`), where packed words and their fused decode have no place."""
    chosen = slots.parts(cfg)
    evicts = any(slots.EVICT in p.slots for p in chosen)
    out = []
    for part in chosen:
        view = part.view(cfg)
        if evicts and slots.KV in part.slots and view.get("backend", "auto") == "auto":
            with open_dict(view):
                view.backend = "torch"
        out.append((part, view))
    return out


def build_recipe(cfg, arch=None, fused_decode: bool | None = None) -> Recipe:
    built = [(choice, build_parts(view, choice.slots, arch, fused_decode))
             for choice, view in part_views(cfg)]
    return Recipe(cfg, built, Bits.from_config(cfg), Formats.from_config(cfg))


def shorthand(name: str, params, knobs, cfg=None) -> Recipe:
    """``method=<name>`` with node ``params`` and the run's ``knobs``, as a recipe of every part the
    method has (scripts and tests that build a method without composing a run; ``cfg``: the run's
    keys a calibration stage reads, when one calibrates)."""
    from omegaconf import OmegaConf

    from qeval.methods import METHODS
    from qeval.recipe.slots import Choice
    spec = METHODS[name]
    cfg = OmegaConf.merge(cfg or {}, {"method": params})
    parts = {slot: build(spec, params, knobs) for slot, build in spec.parts.items()}
    return Recipe(cfg, [(Choice("method", name, spec.slots, params, whole=True), parts)], knobs.bits, knobs.formats)
