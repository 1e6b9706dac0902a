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
from qeval.methods.parts import KVPart
from qeval.methods.spec import Spec
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


def check(cfg) -> None:
    # types and ranges are the schema's (qeval.schema.nodes)
    g, r = cfg.method.group_size, cfg.method.residual_length
    if r % g:
        raise ConfigError(f"method.residual_length={r}: must be a positive multiple of "
                          f"method.group_size={g} (keys are flushed in whole groups)")


def check_model(cfg, linear_widths, head_dim) -> None:
    # values are grouped along the head dimension
    check_divides("method.group_size", cfg.method.group_size, [head_dim], cfg.model.name, "head_dim")


class KIVIKV(KVPart):
    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs)
        self._g, self._r = int(params.group_size), int(params.residual_length)
        self._bits = knobs.bits
        # backend=triton: int32 codes in the cache and fused decode attention (kivi_packed); a
        # layout the kernels cannot hold (e.g. 16-bit keys) runs on torch, and the row says so
        self._backend = "torch"
        if knobs.backend == "triton" and knobs.kv_semantics == "cache" and knobs.fused_decode:
            # imported only here: triton is an optional, Linux-only dependency
            from qeval.methods import kivi_packed
            if kivi_packed.layout_problem(self._bits.k, self._bits.v, self._g) is None:
                self._backend, self._fused = "triton", kivi_packed.FusedDecode()

    def _check_head_dim(self, d: int) -> None:
        if d % self._g:
            raise ConfigError(f"method.group_size={self._g}: must divide the model's head_dim={d} "
                              f"(values are grouped along the head dimension)")

    # -- simulated -----------------------------------------------------------------------------
    def quantize_kv(self, k, v, pad=None, layer_idx=None):
        self._check_head_dim(k.shape[-1])
        return per_row_real(k, v, pad, lambda kb, vb: (
            fake_quantize_keys(kb, self._bits.k, self._g),
            fake_quantize_values(vb, self._bits.v, self._g)))

    # -- cache ---------------------------------------------------------------------------------
    def _compress_keys(self, k: torch.Tensor, first: bool) -> tuple[torch.Tensor, int]:
        if self._bits.k >= FULL_PRECISION_BITS:
            return k, k.numel() * 2
        return fake_quantize(k, self._bits.k, -2, self._g), key_packed_bytes(k.numel(), self._bits.k, self._g)

    def _compress_values(self, v: torch.Tensor, first: bool) -> tuple[torch.Tensor, int]:
        self._check_head_dim(v.shape[-1])
        if self._bits.v >= FULL_PRECISION_BITS:
            return v, v.numel() * 2
        return fake_quantize(v, self._bits.v, -1, self._g), packed_bytes(v.numel(), self._bits.v, self._g)

    def make_cache_layer(self, layer_idx, seq):
        if self._backend == "triton":
            from qeval.methods.kivi_packed import PackedKIVILayer
            return PackedKIVILayer(self, seq, layer_idx, self._fused)
        r = self._r
        # keys: whole blocks of R once R tokens wait; values: token by token, R newest kept
        return BlockCompressedLayer(seq, keys=(r, 0, self._compress_keys), values=(1, r, self._compress_values))

    def attention_implementation(self, base: str) -> str | None:
        if self._backend == "triton":
            from qeval.methods.kivi_packed import register
            return register(self._fused, base)
        return None

    def columns(self) -> dict:
        return {"zero_point": "real", "kv_backend": self._backend}

    def aging(self):
        """Under an evicting cache (:mod:`qeval.kv.aging`): keys flushed in whole blocks of R once R
        kept tokens wait, per channel in groups of G; values per token once older than the newest
        R kept tokens, in groups of G channels."""
        from qeval.kv.aging import Aging, Rule
        g, r, b = self._g, self._r, self._bits
        return Aging(
            Rule(0, r, lambda x, exclude: fake_quantize(x, b.k, -2, g, exclude=exclude),
                 lambda shape: key_packed_bytes(shape.numel(), b.k, g)),
            Rule(r, 1, lambda x, exclude: fake_quantize(x, b.v, -1, g, exclude=exclude),
                 lambda shape: packed_bytes(shape.numel(), b.v, g)))

    def kv_packed_bytes(self, keys, values) -> int:
        return packed_bytes(keys.numel(), self._bits.k, self._g) + packed_bytes(values.numel(), self._bits.v, self._g)


KIVI = Spec("kivi", {KV: KIVIKV}, allowed_bits=(2, 4, 8, 16), check=check, check_model=check_model)
