"""What a method is, as the table (:data:`qeval.methods.METHODS`) holds it: its name, the part it
builds for each recipe slot it fills as the run's ``method=``, what it accepts, and the checks
validation runs before any weights load.

A method is a row, not an object: the runner only ever holds its parts (:mod:`qeval.methods.parts`),
each answering for one target. ``method=uniform`` is three parts (weight, activation, KV) built
from one config node; ``method=smoothquant`` a transform and two round-to-nearest parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from qeval.quant import formats as F
from qeval.recipe.slot_names import ACT, EVICT, KV, WEIGHT


def no_check(*args) -> None:
    """The default of every check: nothing to refuse."""
    return None


def default_identity(cfg) -> dict:
    """What a calibration result depends on besides the model and the data (saved results are
    reused under its hash, :mod:`qeval.calibration.store`): the method's parameters, bits, group
    sizes and formats."""
    from qeval.methods.base import Bits, Formats
    b = Bits.from_config(cfg)
    return {"method": {k: cfg.method[k] for k in cfg.method}, "w_bits": b.w, "a_bits": b.a,
            "w_group_size": cfg.w_group_size, "a_group_size": cfg.a_group_size,
            "formats": Formats.from_config(cfg).names()}


def refuse_file(path) -> dict:
    from qeval.errors import ConfigError
    raise ConfigError(f"{path}: this method reads no published calibration file")


# eq=False: a row is itself (hashed by identity; its ``parts`` table is a dict)
@dataclass(frozen=True, eq=False)
class Spec:
    name: str
    # slot -> the part's class, called (spec, params, knobs); in slot order
    parts: Mapping[str, Callable]
    allowed_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 16)
    semantics: tuple[str, ...] = ("cache", "simulated")
    # number formats it runs (qeval.quant.formats); a method with its own quantizer is integer
    allowed_formats: tuple[F.Format, ...] = (F.INT,)
    # a calibrated method (GPTQ, SmoothQuant, AWQ) computes something from calibration data between
    # model load and the Linear swap (qeval.calibration); its YAML's ``calibration`` key names the
    # preset (qeval/configs/calibration/) that ``calibration=auto`` resolves to
    calibrates: bool = False
    # an eviction method whose cache can hold a recipe's quantized K/V (qeval.kv.aging)
    quantizes_kept: bool = False
    # cfg -> None: parameters that cannot work together (types and ranges are the schema's)
    check: Callable = field(default=no_check)
    # (cfg, linear widths, head_dim) -> None: group sizes that do not divide the model's dimensions
    check_model: Callable = field(default=no_check)
    # (cfg, architecture config) -> None: an architecture the method cannot handle
    check_architecture: Callable = field(default=no_check)
    calibration_identity: Callable = field(default=default_identity)
    # path -> the result a published file stands for (checked), applied instead of calibrating
    read_scales_file: Callable = field(default=refuse_file)

    @property
    def slots(self) -> tuple[str, ...]:
        """The recipe slots (:mod:`qeval.recipe.slot_names`) it fills as the run's ``method=``."""
        return tuple(self.parts)

    @property
    def evicts(self) -> bool:
        return EVICT in self.parts

    @property
    def targets(self) -> frozenset[str]:
        """What its bits may quantize: ``W``, ``WA`` (activations too), ``KV``."""
        s = self.parts
        return frozenset(t for t, on in (("W", WEIGHT in s), ("WA", ACT in s), ("KV", KV in s or EVICT in s)) if on)

