"""GEAR: near-lossless KV cache compression = quantization + sparse outliers + low rank
(Kang et al., arXiv 2403.05527).

A block X (B, H, n, D) of K or V is compressed as X ~ Q + S + L:

- S, sparse outliers: the top and bottom ``outlier_ratio / 2`` of X's entries per (row, head) are
  stored exactly (fp16 value + int32 index) and kept out of the quantizer's min/max;
- Q, the backbone: asymmetric min-max with ``2**bits - 1`` levels at every width (the reference
  outlier path uses ``bits**2 - 1``, which is right only at 2 and 4 bits). ``backbone=kivi``: keys
  per channel over G tokens, values per token over G channels; ``backbone=uniform``: per token;
- L, low rank: the remaining error E = X - Q - S fitted by ``power_iterations`` of block power
  iteration, L = U U^T E with U orthonormal, so ||E - L|| <= ||E|| always. Rank
  ``rank_prefill`` for the prompt and ``rank_decode`` for streamed blocks, or
  ``rank_ratio * min(n, D)`` when set. The random start is one fixed (D, r) matrix shared by every
  row and head, so a sequence gives the same result alone or in a batch.

``cache`` semantics: the prompt's first L - (L mod n_b) tokens are compressed as one block (rank
``rank_prefill``), then every ``stream_block`` new tokens (rank ``rank_decode``); newer tokens stay
in full precision until their block is full. ``simulated``: each attention call's whole K/V, per
sequence with its padding stripped, is compressed as one prefill block.

``backend=triton`` (``cache`` semantics, KIVI backbone at 2/4/8 bits): the cache holds the codes,
the outliers and the low-rank factors for real (:mod:`qeval.methods.gear_packed`) and decode runs
the fused packed-KV kernel with the corrections composed around it; both backends compress with
:func:`qeval.quant.decompose.gear_decompose`, so they keep the same outliers and factors.
"""

from __future__ import annotations

import torch

from qeval.errors import ConfigError, check_divides
from qeval.kv.blocks import BlockCompressedLayer, per_row_real
from qeval.methods.base import Method
from qeval.methods.kivi import fake_quantize_keys, fake_quantize_values
from qeval.quant.decompose import gear_compress
from qeval.quant.primitives import FULL_PRECISION_BITS, fake_quantize, packed_bytes

BACKBONES = ("kivi", "uniform")
OUTLIER_BYTES = 2 + 4   # fp16 value + int32 index per stored outlier


class GEAR(Method):
    name = "gear"
    targets = frozenset({"KV"})
    allowed_bits = (2, 3, 4, 5, 6, 7, 8, 16)
    semantics = ("cache", "simulated")

    @classmethod
    def check(cls, cfg) -> None:
        m = cfg.method
        if m.backbone not in BACKBONES:
            raise ConfigError(f"method.backbone={m.backbone}: allowed: {', '.join(BACKBONES)}")
        if not isinstance(m.outlier_ratio, (int, float)) or not 0 <= m.outlier_ratio < 1:
            raise ConfigError(f"method.outlier_ratio={m.outlier_ratio}: must be a fraction in [0, 1) (GEAR: 0.02)")
        for key in ("rank_prefill", "rank_decode", "power_iterations", "group_size"):
            if not isinstance(m[key], int) or m[key] < (1 if key in ("power_iterations", "group_size") else 0):
                raise ConfigError(f"method.{key}={m[key]}: must be a non-negative integer "
                                  f"({'positive' if key in ('power_iterations', 'group_size') else 'zero allowed'})")
        if m.rank_ratio is not None and not 0 <= m.rank_ratio <= 1:
            raise ConfigError(f"method.rank_ratio={m.rank_ratio}: must be null or a fraction in [0, 1]")
        if not isinstance(m.stream_block, int) or m.stream_block <= 0 or (
                m.backbone == "kivi" and m.stream_block % m.group_size):
            raise ConfigError(f"method.stream_block={m.stream_block}: must be a positive multiple of "
                              f"method.group_size={m.group_size} (the KIVI backbone groups keys over tokens)")

    @classmethod
    def check_model(cls, cfg, linear_widths, head_dim) -> None:
        if cfg.method.backbone == "kivi":  # the KIVI backbone groups values along the head dimension
            check_divides("method.group_size", cfg.method.group_size, [head_dim], cfg.model.name, "head_dim")

    def __init__(self, params, knobs):
        super().__init__(params, knobs)
        self.backbone = params.backbone
        self.group_size = int(params.group_size)
        self.outlier_ratio = float(params.outlier_ratio)
        self.iterations = int(params.power_iterations)
        # backend=triton: codes, outliers and factors really held, fused decode (gear_packed); the
        # uniform backbone or a layout the kernels cannot hold runs on torch, and the row says so
        self.kv_backend = "torch"
        if knobs.backend == "triton" and knobs.kv_semantics == "cache" and self.backbone == "kivi":
            # imported only here: triton is an optional, Linux-only dependency
            from qeval.methods import gear_packed, kivi_packed
            if kivi_packed.layout_problem(self.bits.k, self.bits.v, self.group_size) is None:
                self.kv_backend, self.fused = "triton", kivi_packed.FusedDecode()
                self.packed_layer, self.register_fused = gear_packed.PackedGEARLayer, kivi_packed.register

    def rank(self, first: bool, n: int, d: int) -> int:
        if self.params.rank_ratio is not None:
            return round(self.params.rank_ratio * min(n, d))
        return int(self.params.rank_prefill if first else self.params.rank_decode)

    def quantizer(self, which: str):
        """The backbone as ``f(x, exclude) -> x_hat`` for keys or values."""
        bits = self.bits.k if which == "k" else self.bits.v
        g = self.group_size
        if self.backbone == "uniform":
            return lambda x, ex: fake_quantize(x, bits, -1, None, exclude=ex)
        if which == "k":
            return lambda x, ex: fake_quantize_keys(x, bits, g, ex)
        return lambda x, ex: fake_quantize_values(x, bits, g, ex)

    def _packed(self, x: torch.Tensor, bits: int, n_out: int, rank: int) -> int:
        b, h, n, d = x.shape
        groups = (x.numel() // self.group_size if self.backbone == "kivi" and n % self.group_size == 0
                  else x.numel() // d)
        return (packed_bytes(x.numel() - n_out, bits, None, groups) + n_out * OUTLIER_BYTES
                + b * h * rank * (n + d) * 2)

    def compress(self, x: torch.Tensor, which: str, first: bool) -> tuple[torch.Tensor, int]:
        bits = self.bits.k if which == "k" else self.bits.v
        if bits >= FULL_PRECISION_BITS:
            return x, x.numel() * 2
        y, n_out, r = gear_compress(x, bits, self.quantizer(which), self.outlier_ratio,
                                    self.rank(first, *x.shape[-2:]), self.iterations)
        return y, self._packed(x, bits, n_out, r)

    def quantize_kv(self, k, v, pad=None):
        return per_row_real(k, v, pad, lambda kb, vb: (self.compress(kb, "k", True)[0],
                                                       self.compress(vb, "v", True)[0]))

    def make_cache_layer(self, layer_idx, seq):
        if self.kv_backend == "triton":
            return self.packed_layer(self, seq, layer_idx, self.fused)
        nb = int(self.params.stream_block)
        return BlockCompressedLayer(seq, keys=(nb, 0, lambda x, first: self.compress(x, "k", first)),
                                    values=(nb, 0, lambda x, first: self.compress(x, "v", first)))

    def attention_implementation(self, base: str) -> str | None:
        if self.kv_backend == "triton":
            return self.register_fused(self.fused, base, "gear_packed")
        return None

    def describe(self) -> dict:
        return super().describe() | {"kv_backend": self.kv_backend}
