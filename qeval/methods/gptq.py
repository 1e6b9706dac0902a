"""GPTQ (Frantar et al., arXiv 2210.17323): weights quantized one column at a time, each column's
rounding error spread over the columns not yet quantized through the inverse Hessian of the
layer's reconstruction loss, ``H = 2/n * sum x x^T`` over calibration tokens.

After IST-DASLab/gptq (commit 2d65066): ``gptq.py`` ``GPTQ.add_batch`` (the running Hessian) and
``GPTQ.fasterquant`` (dead inputs, damping, the upper Cholesky factor of ``H^-1``, blocks of lazy
updates, act-order, groups), ``quant.py`` ``Quantizer.find_params`` / ``quantize`` (the asymmetric
grid widened to hold 0: :mod:`qeval.quant.primitives`' ``gptq`` zero point) and ``llama.py``
``llama_sequential`` (layer after layer, each calibrated on the outputs of the layers before it,
already quantized; every Linear of a layer gets its Hessian from one pass of the layer, GPTQ's
default without ``--true-sequential``). Weights only; groups of the top-level ``w_group_size``
along the input dimension (null: one group per output channel, GPTQ's ``--groupsize -1``).

The quantized Linears hold ``fasterquant``'s own weight ``scale * (q - zero)`` (computed in float32,
then cast to the model's dtype), so every layer calibrates on the inputs the reference's would and
the whole sequential pass is the reference's bit for bit (``tests/test_gptq.py``). The saved result
holds the codes, scales, zeros and each input column's group (``g_idx``). With ``backend=triton``
the codes are packed as they are (:meth:`GPTQ.pack_weight`; groups of ``w_group_size`` along the
input in order), as the authors' packed kernel holds them (``quant.py`` ``QuantLinear.pack``:
``self.zeros = zeros * scales``), whose ``code * scale + (-zero * scale)`` is within one float32
rounding of the torch weight (the load-time check allows exactly that gap). Act-order with groups scatters a group's columns over the input, which that layout
cannot hold: refused for ``backend=triton``, run on torch under ``auto``. ``method.static_groups``
(the reference's ``--static-groups``) sizes every group from the weight before any column is
quantized, so with act-order the groups stay contiguous and pack.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass

import torch

from qeval.calibration.layers import (
    decoder_layers,
    first_layer_inputs,
    linears,
    qualified_names,
    run_layer,
    watching,
)
from qeval.errors import ConfigError, check_divides
from qeval.methods.base import Bits
from qeval.methods.parts import Calibrated, WeightPart
from qeval.methods.spec import Spec, default_identity
from qeval.model.keep import resolved
from qeval.quant.formats import INT
from qeval.quant.granularity import Granularity
from qeval.quant.rounding import Rounding
from qeval.recipe.slot_names import WEIGHT


class Hessian:
    """``GPTQ.add_batch`` (gptq.py:32-58): ``H = 2/n * sum x x^T`` in float32, kept as a running
    mean over ``n`` sequences (the reference counts sequences, not tokens; a scale of H changes
    nothing GPTQ computes, since the damping is relative and ``err / Hinv_jj * Hinv_j`` cancels it)."""

    def __init__(self, columns: int, device):
        self.H = torch.zeros(columns, columns, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        batch = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).t().float()          # (T, C) -> (C, T)
        self.H *= self.n / (self.n + batch)
        self.n += batch
        x = math.sqrt(2 / self.n) * x                        # the reference's math.sqrt, not ** 0.5
        self.H += x @ x.t()


def find_params(x: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``Quantizer.find_params`` (quant.py:36-76), one (scale, zero) per row of ``x``, in x's dtype:
    the range widened to hold 0, [-1, 1] for an all-zero row. ``sym`` (``--sym``): the range made
    symmetric, ``[-max|x|, max|x|]`` where the row has a negative value, and the zero at
    ``(maxq + 1) / 2``."""
    zero_ = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    lo, hi = torch.minimum(x.min(1).values, zero_), torch.maximum(x.max(1).values, zero_)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    both = (lo == 0) & (hi == 0)
    lo, hi = torch.where(both, -1.0, lo), torch.where(both, 1.0, hi)
    maxq = 2**bits - 1
    scale = (hi - lo) / maxq
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) / 2)
    return scale, torch.round(-lo / scale)


@dataclass
class Quantized:
    """GPTQ's result for one weight (out, in): integer codes, per-group scale and zero (out, groups),
    and the group of each input column (in,)."""

    codes: torch.Tensor     # uint8
    scale: torch.Tensor     # float32 (or the work dtype)
    zero: torch.Tensor      # integers held as floats
    g_idx: torch.Tensor     # int64

    def offset(self) -> torch.Tensor:
        """(out, groups) ``-zero * scale``: the packed layout's real offset (one rounding)."""
        return -(self.zero * self.scale)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        # ``scale * (code - zero)``, each column with its group's parameters, in the work dtype and
        # then cast: the reference's quantize() (quant.py) and the weight it writes (gptq.py:157),
        # so the next layer calibrates on the inputs the reference's would. The packed layout holds
        # ``code * scale + (-zero * scale)``, within one rounding of it (qeval.quant.packed)
        g = self.g_idx
        return (self.scale[:, g] * (self.codes.to(self.scale.dtype) - self.zero[:, g])).to(dtype)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False, sym: bool = False) -> Quantized:
    """``GPTQ.fasterquant`` (gptq.py:60-160) on ``weight`` (out, in) with ``hessian`` (in, in), in
    float32 (float64 input stays float64). ``static_groups``: every group's scale and zero from the
    weight before any column is quantized (after dead inputs are zeroed), group ``j // G`` for
    original column ``j`` whatever the order (the reference's ``static_groups`` branch)."""
    work = torch.promote_types(weight.dtype, torch.float32)
    W, H = weight.to(work).clone(), hessian.to(work).clone()
    n, maxq = W.shape[1], 2**bits - 1
    G = n if group_size is None else group_size
    scale, zero = find_params(W, bits, sym)     # per channel: from the weight as loaded (gptq.py:72-73)
    dead = H.diagonal() == 0                    # inputs never seen: no error to spread, weight 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = [find_params(W[:, i:i + G], bits, sym) for i in range(0, n, G)] if static_groups and group_size else None
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(n, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    # torch.mean(torch.diag(H)) as the reference: the mean of the strided diagonal view can differ
    # from the contiguous diagonal's by one ulp, which flips codes
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    # upper Cholesky factor of H^-1: row j holds what quantizing column j does to the columns after it
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W)
    scales, zeros = [], []
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                scale, zero = static[int(perm[col]) // G]
            elif group_size is not None and col % group_size == 0:
                # read from W as the reference does (gptq.py:123): within a block W has not yet
                # received this block's updates, so a group starting mid-block (G < block_size) is
                # sized from its columns as they were at the block's start
                scale, zero = find_params(W[:, col:col + group_size], bits, sym)
            if col % G == 0 and static is None:
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            codes[:, col] = q
            err = (w - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]     # the lazy update of every column after the block
    inv = torch.argsort(perm)
    if static is not None:    # groups of original columns: g_idx in order whatever the permutation
        return Quantized(codes[:, inv].to(torch.uint8), torch.stack([s for s, _ in static], 1),
                         torch.stack([z for _, z in static], 1), torch.arange(n, device=W.device) // G)
    return Quantized(codes[:, inv].to(torch.uint8), torch.stack(scales, 1), torch.stack(zeros, 1),
                     (torch.arange(n, device=W.device) // G)[inv])


# llama.py's --true-sequential stages: the attention's inputs, its output, the MLP's inputs, its output
TRUE_SEQUENTIAL = (("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"), ("self_attn.o_proj",),
                   ("mlp.up_proj", "mlp.gate_proj"), ("mlp.down_proj",))


def true_sequential_stages(lins: dict) -> list[list[str]]:
    """The reference's stages over a layer's Linears (Llama-style names, checked before load)."""
    return [[n for n in stage if n in lins] for stage in TRUE_SEQUENTIAL]


def refuse_other_targets(cfg, name: str) -> None:
    """A weight method's shorthand run quantizes nothing but weights."""
    b = Bits.from_config(cfg)
    for key, bits in (("a_bits", b.a), ("kv_bits", min(b.k, b.v))):
        if bits < 16:
            raise ConfigError(f"{key}={bits}: method {name} quantizes weights only; allowed: 16 "
                              f"(method=smoothquant or method=uniform quantize activations)")


def check(cfg) -> None:
    p, b = cfg.method, Bits.from_config(cfg)
    # types and ranges are the schema's (qeval.schema.nodes); the open bound is here
    if p.damp == 0:
        raise ConfigError(f"method.damp={p.damp}: allowed: a number in (0, 1] (a fraction of the mean of diag H)")
    refuse_other_targets(cfg, "gptq")
    if cfg.backend == "triton" and b.w < 16 and p.act_order and cfg.w_group_size and not p.static_groups:
        raise ConfigError(f"backend=triton: method.act_order=true with w_group_size={cfg.w_group_size}: "
                          "act-order's groups are not contiguous along the input, which the packed layout "
                          "needs; allowed: backend=torch or backend=auto, method.static_groups=true, "
                          "method.act_order=false, or w_group_size=null")


def calibration_identity(cfg) -> dict:
    ident = default_identity(cfg)
    for key in ("static_groups", "sym", "true_sequential"):
        if not ident["method"].get(key):   # results saved before the option existed still match
            ident["method"].pop(key, None)
    return ident


def check_architecture(cfg, arch) -> None:
    """``true_sequential`` stages a layer by the reference's Llama names."""
    if not cfg.method.get("true_sequential") or Bits.from_config(cfg).w >= 16:
        return
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        layers = decoder_layers(AutoModelForCausalLM.from_config(arch))[1]
    have = set(linears(layers[0]))
    want = {n for stage in TRUE_SEQUENTIAL for n in stage}
    if have != want:
        raise ConfigError(f"method.true_sequential=true: model {cfg.model.name}'s layers hold "
                          f"{', '.join(sorted(have))}; allowed: false, or a model with the reference's "
                          f"Llama-style Linears ({', '.join(sorted(want))})")


def check_weight_groups(cfg, linear_widths, head_dim) -> None:
    """``w_group_size`` divides every Linear's input width (GPTQ's and AWQ's groups)."""
    if Bits.from_config(cfg).w < 16:
        check_divides("w_group_size", cfg.w_group_size, linear_widths, cfg.model.name, "the Linear input width")


class GPTQWeight(WeightPart, Calibrated):
    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs)
        self._bits = knobs.bits.w
        # the layout the packed kernels read: GPTQ's asymmetric grid, its zero held as an integer code
        self.rounding = Rounding("w", self._bits, Granularity(axis=-1, group_size=knobs.w_group_size), INT,
                                 False, "gptq")
        self._held: set[int] = set()    # storage of the weights GPTQ has written
        # backend=triton: storage -> its codes packed (or why they cannot be), until the swap takes them
        self._packed: dict[int, object] = {}

    def _hold(self, linear, q: Quantized) -> None:
        linear.weight.data = q.dequantize(linear.weight.dtype).to(linear.weight.device)
        self._held.add(linear.weight.data_ptr())
        if self.knobs.backend == "triton":
            self._packed[linear.weight.data_ptr()] = self._pack(q)

    def _pack(self, q: Quantized):
        """GPTQ's own codes in the packed layout, or why they do not fit it."""
        from qeval.quant.packed import PACKABLE_BITS, PackedWeight, pack_codes
        n_out, n_in = q.codes.shape
        G = self.knobs.w_group_size or n_in
        if self._bits not in PACKABLE_BITS:
            return f"w_bits={self._bits}: the packed kernels hold {PACKABLE_BITS}"
        if not torch.equal(q.g_idx, torch.arange(n_in, device=q.g_idx.device) // G):
            return (f"method.act_order=true with w_group_size={self.knobs.w_group_size}: act-order's groups are "
                    "not contiguous along the input (method.static_groups=true keeps them so)")
        # (out, groups) -> (groups, out); scale * code + offset is what the held weight computed
        return PackedWeight(pack_codes(q.codes.to(torch.int32), self._bits), q.scale.float().t().contiguous(),
                            q.offset().float().t().contiguous(), self._bits, G, n_in, n_out, 0)

    def pack_weight(self, w: torch.Tensor, layout: dict):
        """The packed weight of a Linear GPTQ quantized: its codes, scales and zeros as they are
        (``layout``, the round-to-nearest arguments, is not needed)."""
        from qeval.model.linear import UnsupportedLayout
        packed = self._packed.pop(w.data_ptr(), None)
        if packed is None:
            raise UnsupportedLayout("method gptq: this weight was not quantized during calibration with "
                                    "backend=triton")
        if isinstance(packed, str):
            raise UnsupportedLayout(packed)
        return packed

    @torch.no_grad()
    def calibrate(self, model, samples):
        _, layers = decoder_layers(model)
        inputs = first_layer_inputs(model, samples)
        out = {}
        p = self.params
        kept = resolved(self.knobs.w_keep, len(layers))
        for i, layer in enumerate(layers):
            if i in kept:   # w_keep_layers: full precision, and the next layer calibrates on its outputs
                inputs = run_layer(layer, inputs)
                continue
            lins = linears(layer)
            names = qualified_names(model, lins)
            # --true-sequential: each stage's Hessians from a pass with the stages before it quantized
            for stage in (true_sequential_stages(lins) if p.get("true_sequential") else [list(lins)]):
                part = {n: lins[n] for n in stage}
                hessians = {n: Hessian(m.in_features, m.weight.device) for n, m in part.items()}
                with watching(part, lambda n, x, h=hessians: h[n].add(x)):
                    run_layer(layer, inputs)
                for n, m in part.items():
                    q = gptq_quantize(m.weight.data, hessians[n].H, self._bits, self.knobs.w_group_size,
                                      p.block_size, p.damp, p.act_order, p.static_groups, bool(p.get("sym")))
                    out[names[n]] = {k: v.cpu() for k, v in asdict(q).items()}
                    self._hold(m, q)
            inputs = run_layer(layer, inputs)   # the next layer sees this one quantized
        return {"linears": out}

    def apply_calibration(self, model, result) -> None:
        modules = dict(model.named_modules())
        for name, q in result["linears"].items():
            w = modules[name].weight
            self._hold(modules[name], Quantized(**{k: v.to(w.device) for k, v in q.items()}))

    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The weight GPTQ wrote during calibration, as it is."""
        if self._bits >= 16:
            return w
        if w.data_ptr() not in self._held:
            raise RuntimeError("method gptq: this weight was not quantized during calibration (only the "
                               "Linears of the decoder layers are)")
        return w

    def weight_packed_bytes(self, w: torch.Tensor) -> int:
        return self.rounding.packed_bytes(w.shape)

    def columns(self) -> dict:
        return {"zero_point": "gptq", "w_scale_granularity": self.rounding.scale_label()}


GPTQ = Spec("gptq", {WEIGHT: GPTQWeight}, calibrates=True, check=check, check_model=check_weight_groups,
            check_architecture=check_architecture, calibration_identity=calibration_identity)
