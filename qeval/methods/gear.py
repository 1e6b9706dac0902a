"""GEAR: near-lossless KV cache compression = quantization + sparse outliers + low rank
(Kang et al., arXiv 2403.05527).

A block X (B, H, n, D) of K or V is compressed as X ~ Q + S + L:

- S, sparse outliers: the top and bottom ``outlier_ratio / 2`` of X's entries per (row, head) are
  stored exactly (fp16 value + int32 index) and kept out of the quantizer's min/max;
- Q, the backbone: asymmetric min-max with ``2**bits - 1`` levels at every width (see Levels
  below). ``backbone=kivi``: keys per channel over G tokens, values per token over G channels;
  ``backbone=uniform``: per token;
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

``outlier_rule=reference_code`` (default ``paper``) swaps in the authors' code's outlier rule
(:func:`qeval.quant.decompose.reference_outliers`, first difference below), on backend=torch only
(``auto`` runs it on torch and the row says so). Its per-channel key count does not shrink with
the block: in ``cache`` semantics' 64-token streamed blocks every key is kept exact once
s H D >= n_b (Llama-2-7B: 40 per side of 64), as in the reference's ``--stream_grouping`` mode;
its run scripts apply the rule to the whole cache instead.

Differences from the reference code, opengear-project/GEAR @ efe0bfe2b5a3 (under
``GenerationBench/GenerationTest/``: the ``run_template_*.sh`` scripts and the
``GEARLM/Simulated/`` files they run):

- Outliers. Reference (``compress_function.py`` ``gears_channelQ`` 261-296 / ``gears_tokenQ``
  297-333, reached from the GEAR branch 466-495): keys per channel over the tokens, values per
  token across all heads, top and bottom ``int(int(B H n D s) / B / n / 2)`` each (264-267,
  300-303): s/2 of a value token's entries, but s H D / (2n) of a key channel's (s/2 only when
  n = H D); the outliers are replaced by their row's mean before quantizing, so the mean enters
  min/max (276-283, 312-319), then restored (290-291, 327-328). qeval: top and bottom s/2 of
  each (sequence, head)'s n*D entries, kept out of min/max, as the paper describes s.
- Levels. Reference: ``quantize_bit ** 2 - 1`` in that path (285-286, 321-322; the scale's
  divisor at 116, 147). qeval: ``2**bits - 1``, the quantizer's level count (equal at 2, 4 bits).
- Schedule. Reference (``modeling_llama_new.py`` ``LlamaSdpaAttention.forward``, forced at 1079;
  ``run_template_*.sh`` line 4: ``--streaming --streaming_gap 64``, no ``--stream_grouping``):
  the prompt's compression is discarded (stored only ``if self.prefill is False``, 1023-1027), so
  the prompt is cached in full precision (1029); whenever the cache length is a multiple of the
  gap (954-958) the whole cache, compressed tokens included, is compressed again and written back
  (1007-1026), errors compounding, always with ``rank``: ``prefill`` is not passed (1010-1019;
  ``compress_function.py`` 430, 471-476). qeval (the paper's streaming buffer): the prompt's first
  L - (L mod n_b) tokens once with ``rank_prefill``, then each n_b = 64 new tokens once with
  ``rank_decode``; nothing is compressed twice.
"""

from __future__ import annotations

import torch

from qeval.errors import ConfigError, check_divides
from qeval.kv.blocks import BlockCompressedLayer, per_row_real
from qeval.methods.parts import KVPart
from qeval.methods.spec import Spec
from qeval.methods.kivi import fake_quantize_keys, fake_quantize_values
from qeval.quant.decompose import gear_compress, reference_outliers
from qeval.quant.primitives import FULL_PRECISION_BITS, fake_quantize, packed_bytes
from qeval.recipe.slot_names import KV

BACKBONES = ("kivi", "uniform")
OUTLIER_RULES = ("paper", "reference_code")
OUTLIER_BYTES = 2 + 4   # fp16 value + int32 index per stored outlier


def check(cfg) -> None:
    m = cfg.method
    # types, ranges and choices are the schema's (qeval.schema.nodes)
    if m.outlier_ratio == 1:
        raise ConfigError(f"method.outlier_ratio={m.outlier_ratio}: must be a fraction in [0, 1) (GEAR: 0.02)")
    if m.outlier_rule != "paper" and cfg.get("backend") == "triton":
        raise ConfigError(f"method.outlier_rule={m.outlier_rule}: backend=triton allows only paper "
                          "(the packed cache holds a fixed outlier count per head); use backend=torch")
    if m.backbone == "kivi" and m.stream_block % m.group_size:
        raise ConfigError(f"method.stream_block={m.stream_block}: must be a positive multiple of "
                          f"method.group_size={m.group_size} (the KIVI backbone groups keys over tokens)")


def check_model(cfg, linear_widths, head_dim) -> None:
    if cfg.method.backbone == "kivi":  # the KIVI backbone groups values along the head dimension
        check_divides("method.group_size", cfg.method.group_size, [head_dim], cfg.model.name, "head_dim")


class GEARKV(KVPart):
    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs)
        self._bits = knobs.bits
        self._g = int(params.group_size)
        # backend=triton: codes, outliers and factors really held, fused decode (gear_packed); the
        # uniform backbone, the reference code's outlier rule or a layout the kernels cannot hold runs
        # on torch, and the row says so
        self._backend = "torch"
        if (knobs.backend == "triton" and knobs.kv_semantics == "cache" and knobs.fused_decode
                and params.backbone == "kivi" and params.outlier_rule == "paper"):
            # imported only here: triton is an optional, Linux-only dependency
            from qeval.methods import kivi_packed
            if kivi_packed.layout_problem(self._bits.k, self._bits.v, self._g) is None:
                self._backend, self._fused = "triton", kivi_packed.FusedDecode()

    def _rank(self, first: bool, n: int, d: int) -> int:
        if self.params.rank_ratio is not None:
            return round(self.params.rank_ratio * min(n, d))
        return int(self.params.rank_prefill if first else self.params.rank_decode)

    def quantizer(self, which: str):
        """The backbone as ``f(x, exclude) -> x_hat`` for keys or values."""
        bits = self._bits.k if which == "k" else self._bits.v
        g = self._g
        if self.params.backbone == "uniform":
            return lambda x, ex: fake_quantize(x, bits, -1, None, exclude=ex)
        if which == "k":
            return lambda x, ex: fake_quantize_keys(x, bits, g, ex)
        return lambda x, ex: fake_quantize_values(x, bits, g, ex)

    def _outliers(self, which: str):
        """The outlier rule for keys or values as :func:`gear_compress` takes it (None: the paper's)."""
        if self.params.outlier_rule == "paper":
            return None
        return lambda x: reference_outliers(x, float(self.params.outlier_ratio), which)

    def _packed(self, x: torch.Tensor, bits: int, n_out: int, rank: int) -> int:
        b, h, n, d = x.shape
        groups = (x.numel() // self._g if self.params.backbone == "kivi" and n % self._g == 0
                  else x.numel() // d)
        return (packed_bytes(x.numel() - n_out, bits, None, groups) + n_out * OUTLIER_BYTES
                + b * h * rank * (n + d) * 2)

    def compress(self, x: torch.Tensor, which: str, first: bool) -> tuple[torch.Tensor, int]:
        """Keys or values (``which``) of one streaming block (``first``: the prefill's) -> (their
        reconstruction, the bytes a packed layout holds)."""
        bits = self._bits.k if which == "k" else self._bits.v
        if bits >= FULL_PRECISION_BITS:
            return x, x.numel() * 2
        y, n_out, r = gear_compress(x, bits, self.quantizer(which), float(self.params.outlier_ratio),
                                    self._rank(first, *x.shape[-2:]), int(self.params.power_iterations),
                                    self._outliers(which))
        return y, self._packed(x, bits, n_out, r)

    def quantize_kv(self, k, v, pad=None, layer_idx=None):
        return per_row_real(k, v, pad, lambda kb, vb: (self.compress(kb, "k", True)[0],
                                                       self.compress(vb, "v", True)[0]))

    def make_cache_layer(self, layer_idx, seq):
        if self._backend == "triton":
            from qeval.methods.gear_packed import PackedGEARLayer
            return PackedGEARLayer(self, seq, layer_idx, self._fused)
        nb = int(self.params.stream_block)
        return BlockCompressedLayer(seq, keys=(nb, 0, lambda x, first: self.compress(x, "k", first)),
                                    values=(nb, 0, lambda x, first: self.compress(x, "v", first)))

    def kv_packed_bytes(self, keys, values) -> int:
        """Per-token integer codes at the run's bits (the layers report their own bytes held)."""
        return sum(packed_bytes(x.numel(), bits, None, x.numel() // x.shape[-1])
                   for x, bits in ((keys, self._bits.k), (values, self._bits.v)))

    def attention_implementation(self, base: str) -> str | None:
        if self._backend == "triton":
            from qeval.methods.kivi_packed import register
            return register(self._fused, base, "gear_packed")
        return None

    def columns(self) -> dict:
        return {"zero_point": "real", "kv_backend": self._backend}

    def aging(self):
        return "it compresses streaming blocks (outliers and a low-rank fit over each block's tokens) that eviction would break"


GEAR = Spec("gear", {KV: GEARKV}, check=check, check_model=check_model)
