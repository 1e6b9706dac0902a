"""The run's :class:`~qeval.recipe.recipe.Recipe` from its config: each chosen part built as its
method from its own view of the config (:meth:`qeval.recipe.slots.Part.view`)."""

from __future__ import annotations

from omegaconf import open_dict

from qeval.methods.base import Bits, Formats
from qeval.methods.build import build_method
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


def build_recipe(cfg, arch=None, registered_attention: bool | None = None) -> Recipe:
    built = [(part, build_method(view, arch, registered_attention)) for part, view in part_views(cfg)]
    return Recipe(cfg, built, Bits.from_config(cfg), Formats.from_config(cfg))
