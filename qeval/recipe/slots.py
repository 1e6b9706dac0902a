"""Which part of a run's recipe quantizes what: the slots, the table of which method serves which
slot, and the parts a config chooses (``method=`` as the shorthand, ``weight=`` ``act=`` ``kv=``
``evict=`` ``transform=[...]`` per slot).

| slot        | what it does                                   | chosen by                 | served by                          |
| ----------- | ---------------------------------------------- | ------------------------- | ---------------------------------- |
| ``transform`` | changes the model before anything is quantized | ``transform=[a,b]`` (in order) | smoothquant                    |
| ``weight``  | quantizes each Linear's weight once             | ``weight=``               | uniform, group, gptq, awq          |
| ``act``     | quantizes each Linear's input on the fly        | ``act=``                  | uniform, group                     |
| ``kv``      | quantizes the keys and values                   | ``kv=``                   | uniform, group, kivi, gear         |
| ``evict``   | drops tokens from the KV cache                  | ``evict=``                | h2o, streaming                     |

``method=<name>`` fills every slot its method serves (its class's ``slots``) that no per-slot choice
takes: ``method=kivi kv_bits=2`` is ``kv=kivi kv_bits=2``, ``method=smoothquant`` is the smoothing
transform with uniform's per-channel weights and per-token activations, and ``method=gptq
kv=kivi`` is GPTQ weights with a KIVI cache. A method none of whose slots is left to it is
refused (``method=kivi kv=gear``), unless it is the default filler (``method=uniform``, left at
its default).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf, open_dict

from qeval.errors import ConfigError
from qeval.quant.formats import INT
from qeval.recipe.slot_names import ACT, EVICT, KV, SLOTS, TRANSFORM, WEIGHT  # noqa: F401  (re-exported)

CHOSEN_ONE = (WEIGHT, ACT, KV, EVICT)                # one part each; transforms are a list


def serves(name: str) -> tuple[str, ...]:
    """The slots method ``name`` fills when it is the run's ``method`` (its class's ``slots``)."""
    from qeval.methods import METHODS
    return METHODS[name].slots


DEFAULT_METHOD = "uniform"   # config.yaml's default: it fills what no part takes, and may fill nothing

# which bits keys belong to which slot: a part's view of the config keeps only its own
SLOT_BITS = {WEIGHT: ("w_bits",), ACT: ("a_bits",), KV: ("kv_bits", "k_bits", "v_bits")}
SLOT_FORMAT = {WEIGHT: "w_format", ACT: "a_format", KV: "kv_format"}


@dataclass(frozen=True)
class Choice:
    """One choice of a part: its method's name, the slots it fills, the config key that chose it
    (``method``, ``weight``, ..., ``transform.smoothquant``) and its node."""

    key: str
    name: str
    slots: tuple[str, ...]
    node: DictConfig
    whole: bool = False   # the only part (a shorthand run): it reads the run's config as it is

    def view(self, cfg) -> DictConfig:
        """``cfg`` as this part's method reads it: its node as ``method`` and the bits (and number
        formats) of the slots it does not fill at 16 (int), so a method's own checks see only
        what it quantizes. A transform sees the weight and activation bits it prepares for. The
        only part of a shorthand run reads ``cfg`` itself, so ``method=X`` runs as it always has."""
        if self.whole:
            return cfg
        out = copy.deepcopy(cfg)
        mine = set(self.slots) | ({WEIGHT, ACT} if TRANSFORM in self.slots else set())
        with open_dict(out):
            out.method = copy.deepcopy(self.node)
            for slot, keys in SLOT_BITS.items():
                if slot in mine:
                    continue
                for key in keys:
                    out[key] = None if key in ("k_bits", "v_bits") else 16
                out[SLOT_FORMAT[slot]] = INT.name
        return out


def _nodes(cfg) -> tuple[dict[str, DictConfig], list[tuple[str, DictConfig]]]:
    """(the per-slot choices present, the transforms in order)."""
    chosen = {slot: cfg[slot] for slot in CHOSEN_ONE if cfg.get(slot) is not None}
    transforms = list((cfg.get(TRANSFORM) or {}).items())
    return chosen, transforms


def parts(cfg) -> list[Choice]:
    """The parts ``cfg`` chooses, in :data:`SLOTS` order (a shorthand ``method`` part first where
    it fills the transform slot)."""
    chosen, transforms = _nodes(cfg)
    name = cfg.method.name
    if not chosen and not transforms:
        return [Choice("method", name, serves(name), cfg.method, whole=True)]
    taken = set(chosen) | ({TRANSFORM} if transforms else set())
    left = tuple(s for s in serves(name) if s not in taken)
    given = [f"{s}={chosen[s].name}" for s in serves(name) if s in chosen]
    if transforms and TRANSFORM in serves(name):
        given.append(f"transform=[{','.join(n for n, _ in transforms)}]")
    if not left and name != DEFAULT_METHOD:
        raise ConfigError(f"method={name}: {' and '.join(given)} take{'s' if len(given) == 1 else ''} every "
                          f"target it quantizes; allowed: one of them (drop method={name} or the other)")
    found = [Choice(f"{TRANSFORM}.{n}", node.name, (TRANSFORM,), node) for n, node in transforms]
    if left:
        found.append(Choice("method", name, left, cfg.method))
    found += [Choice(slot, node.name, (slot,), node) for slot, node in chosen.items()]
    order = {s: i for i, s in enumerate(SLOTS)}
    return sorted(found, key=lambda p: min(order[s] for s in p.slots))


def is_shorthand(cfg) -> bool:
    """Whether ``cfg`` chooses no part beyond ``method`` (every run before recipes)."""
    chosen, transforms = _nodes(cfg)
    return not chosen and not transforms


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
