"""KIVI: tuning-free asymmetric 2-bit KV cache quantization (Liu et al., arXiv 2402.02750).

Asymmetric min-max round-to-nearest with fp16 scale and zero per group:

| tensor | statistics                         | grouped axis | group |
| ------ | ---------------------------------- | ------------ | ----- |
| keys   | per channel, over G tokens         | -2 (tokens)  | G     |
| values | per token, over G channels         | -1 (head dim)| G     |

``cache`` semantics (the paper's): prefill attends in full precision. Keys keep a full-precision
residual of up to R tokens and are flushed only in whole blocks of R (R % G == 0), after the step
that filled the block has attended to it, so a key group always holds G real tokens (a group of one
token would have min == max and be silently lossless). Values keep the newest R tokens in full
precision as a sliding window; older tokens are quantized one by one, which is exact per-token
grouping. A prompt of L tokens leaves its first L - (L mod R) keys quantized.

``simulated`` semantics: the whole K/V of each attention call is quantized with KIVI's grouping and
no residual; key groups are aligned to the newest token (right-aligned), so the oldest group may be
partial, and each sequence's left padding is stripped first.

The quantization itself is the pure functions below, the reference a packed kernel is checked
against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qeval.errors import ConfigError, check_divides
from qeval.kv.blocks import BlockCompressedLayer, per_row_real
from qeval.methods.base import Method
from qeval.quant.primitives import (
    FULL_PRECISION_BITS,
    QParams,
    fake_quantize,
    packed_bytes,
    quantize,
)
from qeval.recipe.slot_names import KV


def quantize_keys(k: torch.Tensor, bits: int, group_size: int) -> QParams:
    """(B, H, T, D) with T % G == 0 -> codes (B, H, D, T // G, G): per channel, G tokens a group."""
    return quantize(k, bits, axis=-2, group_size=group_size)


def quantize_values(v: torch.Tensor, bits: int, group_size: int) -> QParams:
    """(B, H, T, D) with D % G == 0 -> codes (B, H, T, D // G, G): per token, G channels a group."""
    return quantize(v, bits, axis=-1, group_size=group_size)


def fake_quantize_keys(k: torch.Tensor, bits: int, group_size: int,
                       exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel key quantization with groups aligned to the newest token.

    When T % G != 0 the oldest group is partial: it is completed with excluded filler positions
    (kept out of min/max) so the grouping matches KIVI's blocks counted back from the end.
    """
    if bits >= FULL_PRECISION_BITS:
        return k
    t = k.shape[-2]
    extra = (-t) % group_size
    if extra == 0:
        return fake_quantize(k, bits, -2, group_size, exclude=None if exclude is None else exclude.expand_as(k))
    # (B, H, T, D) -> (B, H, extra + T, D), filler first
    kp = F.pad(k, (0, 0, extra, 0))
    ex = torch.zeros_like(kp, dtype=torch.bool)
    ex[..., :extra, :] = True
    if exclude is not None:
        ex[..., extra:, :] |= exclude.expand_as(k)
    return fake_quantize(kp, bits, -2, group_size, exclude=ex)[..., extra:, :]


def fake_quantize_values(v: torch.Tensor, bits: int, group_size: int,
                         exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token value quantization in groups of G channels."""
    return fake_quantize(v, bits, -1, group_size, exclude=None if exclude is None else exclude.expand_as(v))


def key_packed_bytes(n_elements: int, bits: int, group_size: int) -> int:
    return packed_bytes(n_elements, bits, group_size)


class KIVI(Method):
    name = "kivi"
    slots = (KV,)
    targets = frozenset({"KV"})
    allowed_bits = (2, 4, 8, 16)
    semantics = ("cache", "simulated")

    @classmethod
    def check(cls, cfg) -> None:
        # types and ranges are the schema's (qeval.schema.nodes)
        g, r = cfg.method.group_size, cfg.method.residual_length
        if r % g:
            raise ConfigError(f"method.residual_length={r}: must be a positive multiple of "
                              f"method.group_size={g} (keys are flushed in whole groups)")

    def __init__(self, params, knobs):
        super().__init__(params, knobs)
        self.group_size = int(params.group_size)
        self.residual_length = int(params.residual_length)
        # backend=triton: int32 codes in the cache and fused decode attention (kivi_packed); a
        # layout the kernels cannot hold (e.g. 16-bit keys) runs on torch, and the row says so
        self.kv_backend = "torch"
        if knobs.backend == "triton" and knobs.kv_semantics == "cache" and knobs.registered_attention:
            # imported only here: triton is an optional, Linux-only dependency
            from qeval.methods import kivi_packed
            if kivi_packed.layout_problem(self.bits.k, self.bits.v, self.group_size) is None:
                self.kv_backend, self.fused = "triton", kivi_packed.FusedDecode()
                self.packed_layer, self.register_fused = kivi_packed.PackedKIVILayer, kivi_packed.register

    @classmethod
    def check_model(cls, cfg, linear_widths, head_dim) -> None:
        # values are grouped along the head dimension
        check_divides("method.group_size", cfg.method.group_size, [head_dim], cfg.model.name, "head_dim")

    def _check_head_dim(self, d: int) -> None:
        if d % self.group_size:
            raise ConfigError(f"method.group_size={self.group_size}: must divide the model's head_dim={d} "
                              f"(values are grouped along the head dimension)")

    # -- simulated -----------------------------------------------------------------------------
    def quantize_kv(self, k, v, pad=None):
        self._check_head_dim(k.shape[-1])
        return per_row_real(k, v, pad, lambda kb, vb: (
            fake_quantize_keys(kb, self.bits.k, self.group_size),
            fake_quantize_values(vb, self.bits.v, self.group_size)))

    # -- cache ---------------------------------------------------------------------------------
    def _compress_keys(self, k: torch.Tensor, first: bool) -> tuple[torch.Tensor, int]:
        if self.bits.k >= FULL_PRECISION_BITS:
            return k, k.numel() * 2
        return fake_quantize(k, self.bits.k, -2, self.group_size), key_packed_bytes(k.numel(), self.bits.k, self.group_size)

    def _compress_values(self, v: torch.Tensor, first: bool) -> tuple[torch.Tensor, int]:
        self._check_head_dim(v.shape[-1])
        if self.bits.v >= FULL_PRECISION_BITS:
            return v, v.numel() * 2
        return fake_quantize(v, self.bits.v, -1, self.group_size), packed_bytes(v.numel(), self.bits.v, self.group_size)

    def make_cache_layer(self, layer_idx, seq):
        if self.kv_backend == "triton":
            return self.packed_layer(self, seq, layer_idx, self.fused)
        r = self.residual_length
        # keys: whole blocks of R once R tokens wait; values: token by token, R newest kept
        return BlockCompressedLayer(seq, keys=(r, 0, self._compress_keys), values=(1, r, self._compress_values))

    def attention_implementation(self, base: str) -> str | None:
        if self.kv_backend == "triton":
            return self.register_fused(self.fused, base)
        return None

    def describe(self) -> dict:
        return super().describe() | {"kv_backend": self.kv_backend}

    def aging_rules(self):
        """Under an evicting cache (:mod:`qeval.kv.aging`): keys flushed in whole blocks of R once R
        kept tokens wait, per channel in groups of G; values per token once older than the newest
        R kept tokens, in groups of G channels."""
        from qeval.kv.aging import Aging, Rule
        g, r, b = self.group_size, self.residual_length, self.bits
        return Aging(
            Rule(0, r, lambda x, exclude: fake_quantize(x, b.k, -2, g, exclude=exclude),
                 lambda shape: key_packed_bytes(shape.numel(), b.k, g)),
            Rule(r, 1, lambda x, exclude: fake_quantize(x, b.v, -1, g, exclude=exclude),
                 lambda shape: packed_bytes(shape.numel(), b.v, g)))

    def aging_problem(self) -> str | None:
        return None

    def kv_packed_bytes(self, keys, values) -> int:
        return (packed_bytes(keys.numel(), self.bits.k, self.group_size)
                + packed_bytes(values.numel(), self.bits.v, self.group_size))
