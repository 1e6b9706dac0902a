"""Round-to-nearest min-max in groups of g consecutive elements (group-wise quantization).

Weights: groups of ``w_group_size`` along the input (reduction) dimension, the layout of
GPTQ/AWQ-style int4 kernels. Activations: groups of ``a_group_size`` channels per token (null: the
whole token). K/V: groups of ``kv_group_size`` channels of each head per token (null: the whole
head). This is Qllm-Eval's setting (arXiv 2402.18158; ``pseudo_quantize_tensor`` with
``q_group_size``): weights in groups of 128, activations per token, K/V per token after RoPE, all
with its integer zero point (``zero_point``, :mod:`qeval.quant.primitives`).

FP8 formats take one float32 scale per group (fine-grained FP8, as DeepSeek-V3's 1 x 128 tiles);
MX and NVFP4 are refused: their 32- or 16-element blocks are their grouping (``method=uniform``).
"""

from __future__ import annotations

from qeval.errors import check_divides
from qeval.methods.base import Bits
from qeval.methods.round import RoundAct, RoundKV, RoundWeight
from qeval.methods.spec import Spec
from qeval.methods.uniform import check_zero_point
from qeval.quant.formats import INT, STORED
from qeval.quant.granularity import Granularity
from qeval.recipe.slot_names import ACT, KV, WEIGHT


def check_model(cfg, linear_widths, head_dim) -> None:
    name = cfg.model.name
    bits = Bits.from_config(cfg)
    if bits.w < 16:
        check_divides("w_group_size", cfg.w_group_size, linear_widths, name, "the Linear input width")
    if bits.a < 16:
        check_divides("a_group_size", cfg.a_group_size, linear_widths, name, "the Linear input width")
    if min(bits.k, bits.v) < 16:
        check_divides("kv_group_size", cfg.kv_group_size, [head_dim], name, "head_dim")


class GroupWeight(RoundWeight):
    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs, Granularity(axis=-1, group_size=knobs.w_group_size))


class GroupAct(RoundAct):
    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs, Granularity(axis=-1, group_size=knobs.a_group_size))


class GroupKV(RoundKV):
    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs, Granularity(axis=-1, group_size=knobs.kv_group_size))


GROUP = Spec("group", {WEIGHT: GroupWeight, ACT: GroupAct, KV: GroupKV}, allowed_formats=(INT, *STORED),
             check=check_zero_point, check_model=check_model)
