"""Round-to-nearest min-max, one group per tensor / channel / token.

The per-tensor / per-channel / per-token family of Qllm-Eval's round-to-nearest baseline
(arXiv 2402.18158); the study's own settings (weights in groups of 128) are ``method=group``.
``*_granularity`` selects where the statistics are taken, ``zero_point`` where the grid sits
(:mod:`qeval.quant.primitives`: ``integer`` is Qllm-Eval's ``pseudo_quantize_tensor``, the
default; ``real`` is KIVI's and GEAR's; ``gptq`` widens the range to hold 0). Weights, activations
and K/V all use the one convention, as Qllm-Eval quantizes all three with the same function.

Every number format runs here (``*_format``, :mod:`qeval.quant.formats`): FP8 takes one scale per
group of ``*_granularity``; MX and NVFP4 bring their own blocks, which replace the granularity
(rows record the scales' granularity either way: ``w_scale_granularity`` ...).
"""

from __future__ import annotations

from qeval.errors import ConfigError
from qeval.methods.base import Bits, Formats
from qeval.methods.round import RoundAct, RoundKV, RoundWeight
from qeval.methods.spec import Spec
from qeval.quant.formats import FORMATS
from qeval.quant.granularity import Granularity
from qeval.quant.primitives import ZERO_POINTS
from qeval.recipe.slot_names import ACT, KV, WEIGHT

W_GRANULARITIES = {"per_tensor": Granularity(axis=None), "per_channel": Granularity(axis=-1)}
A_GRANULARITIES = {"per_tensor": Granularity(per_sequence=True), "per_token": Granularity(axis=-1)}
# (B, H, T, D): per token = over D; per channel = over the tokens of each stored chunk (D fixed);
# per tensor = one group per sequence, so batched and per-sequence runs agree.
KV_GRANULARITIES = {"per_tensor": Granularity(per_sequence=True), "per_token": Granularity(axis=-1),
                    "per_channel": Granularity(axis=-2)}


def check_zero_point(cfg) -> None:
    """``method.zero_point`` must name a convention of :data:`qeval.quant.primitives.ZERO_POINTS`."""
    if cfg.method.zero_point not in ZERO_POINTS:
        raise ConfigError(f"method.zero_point={cfg.method.zero_point}: allowed: {', '.join(ZERO_POINTS)}")


def check(cfg) -> None:
    for key, table in (("w_granularity", W_GRANULARITIES), ("a_granularity", A_GRANULARITIES),
                       ("kv_granularity", KV_GRANULARITIES)):
        if cfg.method[key] not in table:
            raise ConfigError(f"method.{key}={cfg.method[key]}: allowed: {', '.join(table)}")
    check_zero_point(cfg)
    bits = Bits.from_config(cfg)
    own_blocks = Formats.from_config(cfg).kv.block is not None   # MX / NVFP4 ignore the granularity
    if (cfg.method.kv_granularity == "per_channel" and cfg.kv_semantics == "cache" and min(bits.k, bits.v) < 16
            and not own_blocks):
        # one decode token per stored chunk makes per-channel statistics lossless (min == max)
        raise ConfigError("method.kv_granularity=per_channel: with kv_semantics=cache each decode token "
                          "would be its own group and lossless; use kv_semantics=simulated or method=kivi")


class UniformWeight(RoundWeight):
    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs, W_GRANULARITIES[params.w_granularity])


class UniformAct(RoundAct):
    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs, A_GRANULARITIES[params.a_granularity])


class UniformKV(RoundKV):
    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs, KV_GRANULARITIES[params.kv_granularity])


UNIFORM = Spec("uniform", {WEIGHT: UniformWeight, ACT: UniformAct, KV: UniformKV},
               allowed_bits=(1, 2, 3, 4, 5, 6, 7, 8, 16), allowed_formats=tuple(FORMATS.values()), check=check)
