"""Methods built the way a run builds them: from their shipped YAML (``qeval/configs/method/<name>.yaml``)
with a few keys overridden, so a test never retypes a method's parameters.

``CONTRACT`` is the table every registered method must have a row in (tests/test_method_contract.py
fails loudly for a method without one): the settings that put the method to work on the tiny test
models (small groups, so short prompts cross several blocks) and the KV bits it is tested at.
``CHOICES`` lists the parameters that take one of a few named values (``zero_point``, the
granularities), each checked by the method with a one-line error.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from qeval.methods import METHODS
from qeval.methods.base import Bits, Formats, Knobs
from qeval.quant.formats import lookup
from qeval.recipe.recipe import Recipe
from qeval.recipe.build import shorthand
from qeval.validate import CONFIG_DIR

# name -> (overrides for tiny models, KV bits it is tested at, the semantics it supports)
CONTRACT = {
    "uniform": (dict(), 4, ("cache", "simulated")),
    "group": (dict(), 4, ("cache", "simulated")),
    "kivi": (dict(group_size=8, residual_length=16), 2, ("cache", "simulated")),
    "gear": (dict(group_size=8, stream_block=16), 2, ("cache", "simulated")),
    "h2o": (dict(heavy_ratio=0.2, recent_ratio=0.2), 16, ("cache",)),
    "streaming": (dict(n_sink=2, recent_ratio=0.2), 16, ("cache",)),
    # calibrated W/WA methods: no KV of their own; test_gptq/_smoothquant/_awq.py test their weights
    "gptq": (dict(), 16, ("cache", "simulated")),
    "smoothquant": (dict(), 16, ("cache", "simulated")),
    "awq": (dict(), 16, ("cache", "simulated")),
}

# name -> {parameter: every value the method's ``check`` accepts, in the order its error lists
# them}; any other value must be a one-line ConfigError naming the key, the value and these
CHOICES = {
    "uniform": {"zero_point": ("real", "integer", "gptq"),
                "w_granularity": ("per_tensor", "per_channel"),
                "a_granularity": ("per_tensor", "per_token"),
                "kv_granularity": ("per_tensor", "per_token", "per_channel")},
    "group": {"zero_point": ("real", "integer", "gptq")},
    "smoothquant": {"zero_point": ("real", "integer", "gptq")},
    "awq": {"zero_point": ("real", "integer", "gptq")},
    "gear": {"outlier_rule": ("paper", "reference_code")},
}


def method_params(name: str, **overrides):
    """The method's node as a run composes it: its YAML, then ``overrides`` (each must be a key the
    YAML has, so a renamed parameter fails here instead of being silently ignored)."""
    params = OmegaConf.load(CONFIG_DIR / "method" / f"{name}.yaml")
    unknown = set(overrides) - set(params)
    assert not unknown, f"method {name} has no parameter {sorted(unknown)}"
    return OmegaConf.merge(params, overrides)


def make_method(name: str, kv_bits: int = 16, semantics: str = "cache", backend: str = "torch", *,
                w_bits: int = 16, a_bits: int = 16, k_bits: int | None = None, v_bits: int | None = None,
                w_group_size: int | None = 128, a_group_size: int | None = None,
                kv_group_size: int | None = None, w_format: str = "int", a_format: str = "int",
                kv_format: str = "int", **overrides) -> Recipe:
    """``method=<name>`` as a run holds it, a recipe of the method's parts, from its YAML and the
    run's knobs (``k_bits``/``v_bits`` override ``kv_bits``, and a non-int ``*_format`` sets its
    own bits, as on the command line)."""
    k, v = kv_bits if k_bits is None else k_bits, kv_bits if v_bits is None else v_bits
    bits = Bits(*(lookup(f).width(b) for b, f in ((w_bits, w_format), (a_bits, a_format), (k, kv_format),
                                                      (v, kv_format))))
    formats = Formats(w_format, a_format, kv_format)
    knobs = Knobs(bits, w_group_size, a_group_size, kv_group_size, semantics, backend, formats)
    cfg = OmegaConf.create({"w_bits": w_bits, "a_bits": a_bits, "kv_bits": kv_bits, "k_bits": k_bits,
                            "v_bits": v_bits, "w_group_size": w_group_size, "a_group_size": a_group_size,
                            "kv_group_size": kv_group_size, "w_format": w_format, "a_format": a_format,
                            "kv_format": kv_format, "kv_semantics": semantics, "backend": backend})
    return from_knobs(name, method_params(name, **overrides), knobs, cfg)


def from_knobs(name: str, params, knobs: Knobs, cfg=None) -> Recipe:
    """``method=<name>`` with node ``params`` and ``knobs``, as the recipe a run holds."""
    return shorthand(name, params, knobs, cfg)


def make_part(name: str, *args, **kwargs):
    """The one part of a single-target method (KIVI's KV part, GPTQ's weight part ...), built as
    :func:`make_method` builds it."""
    (_, parts), = make_method(name, *args, **kwargs).parts
    (part,) = parts.values()
    return part


def make_contract_method(name: str, semantics: str = "cache", **overrides):
    """The method at its contract row's settings and bits."""
    settings, bits, _ = CONTRACT[name]
    return make_method(name, bits, semantics, **(settings | overrides))


def check_params(cfg) -> None:
    """A method node checked as validation checks it: its types and ranges by the schema, then
    what relates its keys by the method's own ``check``."""
    from qeval.schema.check import check_method
    check_method("method", OmegaConf.to_container(cfg.method, resolve=True))
    METHODS[cfg.method.name].check(cfg)
