"""Round-to-nearest min-max, one group per tensor / channel / token (Qllm-Eval's baseline).

Qllm-Eval (arXiv 2402.18158) quantizes weights per output channel, activations per token and the
KV cache per token after RoPE; ``*_granularity`` selects coarser or finer statistics.
"""

from __future__ import annotations

from qeval.errors import ConfigError
from qeval.methods.base import Method
from qeval.quant.granularity import Granularity

W_GRANULARITIES = {"per_tensor": Granularity(axis=None), "per_channel": Granularity(axis=-1)}
A_GRANULARITIES = {"per_tensor": Granularity(per_sequence=True), "per_token": Granularity(axis=-1)}
# (B, H, T, D): per token = over D; per channel = over the tokens of each stored chunk (D fixed);
# per tensor = one group per sequence, so batched and per-sequence runs agree.
KV_GRANULARITIES = {"per_tensor": Granularity(per_sequence=True), "per_token": Granularity(axis=-1),
                    "per_channel": Granularity(axis=-2)}


class Uniform(Method):
    name = "uniform"
    allowed_bits = (1, 2, 3, 4, 5, 6, 7, 8, 16)

    @classmethod
    def check(cls, cfg) -> None:
        for key, table in (("w_granularity", W_GRANULARITIES), ("a_granularity", A_GRANULARITIES),
                           ("kv_granularity", KV_GRANULARITIES)):
            if cfg.method[key] not in table:
                raise ConfigError(f"method.{key}={cfg.method[key]}: allowed: {', '.join(table)}")
        if cfg.method.kv_granularity == "per_channel" and cfg.kv_semantics == "cache" and cfg.kv_bits < 16:
            # one decode token per stored chunk makes per-channel statistics lossless (min == max)
            raise ConfigError("method.kv_granularity=per_channel: with kv_semantics=cache each decode token "
                              "would be its own group and lossless; use kv_semantics=simulated or method=kivi")

    def __init__(self, params, knobs):
        super().__init__(params, knobs)
        self.w_gran = W_GRANULARITIES[params.w_granularity]
        self.a_gran = A_GRANULARITIES[params.a_granularity]
        self.k_gran = self.v_gran = KV_GRANULARITIES[params.kv_granularity]
