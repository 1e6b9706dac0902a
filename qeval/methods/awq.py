"""AWQ (Lin et al., arXiv 2306.00978): activation-aware weight quantization. Per decoder layer, a
per-input-channel scale ``s`` searched so that quantizing ``W * s`` (and feeding ``x / s``) loses the
least of the block's output, folded into the op before; then each output group's range clipped to
what loses least; then weights quantized round-to-nearest in groups (W only).

After mit-han-lab/llm-awq (commit d6e797a): ``awq/quantize/pre_quant.py`` ``run_awq`` (layer after
layer on the full-precision model's own activations: a layer's outputs are taken before its scales
and clips are applied, so no layer sees another's quantization), ``awq/quantize/auto_scale.py``
``auto_scale_block`` / ``_search_module_scale`` / ``apply_scale`` (``x_mean`` = mean |x| per channel;
for ``ratio = i / n_grid``, i = 0..n_grid-1: ``s = x_mean ** ratio`` clamped at 1e-4 and divided by
``sqrt(s.max() * s.min())``; the loss is the mean squared difference of the inspected module's
output; every group's search runs on the unscaled layer and all are applied after) and
``awq/quantize/auto_clip.py`` ``auto_clip_layer`` / ``auto_clip_block`` (every Linear but q/k: for
each output row and group, ``max_val = amax |w| * (1 - i / n_grid)`` for i below ``max_shrink *
n_grid`` (0 to 45 % with the defaults), ``w`` clamped to ``[-max_val, max_val]`` and quantized, the
group's partial outputs over 512 evenly strided calibration tokens compared; the inputs are the
scaled ones). The quantizer throughout is ``pseudo_quantize_tensor``: ``method=group``'s weights with
the integer zero point. The saved result is the authors' ``{"scale": [(prev op, (Linears), s)],
"clip": [(Linear, max_val)]}`` with names in the model: ``torch.save`` of it is an llm-awq
``awq_cache`` file, and ``method.scales_file=<awq_cache/*.pt>`` applies such a file (the authors' or
Qllm-Eval's) instead of calibrating (:mod:`qeval.calibration.published`).

Which op each scale folds into (norms, v -> o without GQA, up -> down; OPT's fc1 -> fc2) is
:mod:`qeval.calibration.fold`. Samples run one at a time, so the losses are sums over samples
divided by the element count: the reference's mean over its batch of equal-length blocks.
"""

from __future__ import annotations

import torch

from qeval.calibration import fold, published
from qeval.calibration.layers import (
    decoder_layers,
    first_layer_inputs,
    hidden,
    linears,
    run_layer,
    watching,
)
from qeval.errors import ConfigError
from qeval.model.keep import resolved
from qeval.methods.base import Bits
from qeval.methods.gptq import check_weight_groups, refuse_other_targets
from qeval.methods.parts import Calibrated
from qeval.methods.round import RoundWeight
from qeval.methods.spec import Spec, default_identity
from qeval.methods.uniform import check_zero_point
from qeval.quant.granularity import Granularity
from qeval.quant.primitives import fake_quantize
from qeval.recipe.slot_names import WEIGHT

SCALE_FLOOR = 1e-4          # auto_scale.py:130
CLIP_TOKENS = 512           # auto_clip.py: n_sample_token
ROWS_PER_CHUNK = 64         # auto_clip.py's oc_batch_size: memory only, rows are independent
NO_CLIP = ("q_", "k_", "query", "key", "Wqkv")   # auto_clip.py:75: q/k meet in a matmul, not clipped


@torch.no_grad()
def search_scale(block, fcs, feats, kwargs, quantize, n_grid: int) -> torch.Tensor:
    """``_search_module_scale`` (auto_scale.py:109-156): the ``s`` of the grid whose quantized
    ``fcs`` change ``block``'s output least on ``feats`` (one (1, T, C) input per sample)."""
    x_mean = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]).abs().mean(0)
    reference = [hidden(block(x, **kw)) for x, kw in zip(feats, kwargs)]
    originals = [fc.weight.data.clone() for fc in fcs]
    best, best_s = float("inf"), None
    for i in range(n_grid):
        s = x_mean.pow(i / n_grid).clamp(min=SCALE_FLOOR).view(-1)
        s = s / (s.max() * s.min()).sqrt()
        for fc in fcs:
            fc.weight.mul_(s.view(1, -1))
            fc.weight.data = quantize(fc.weight.data) / s.view(1, -1)
        sse = sum(float((r - hidden(block(x, **kw))).float().pow(2).sum())
                  for r, x, kw in zip(reference, feats, kwargs))
        loss = sse / sum(r.numel() for r in reference)
        if loss < best:
            best, best_s = loss, s
        for fc, w in zip(fcs, originals):
            fc.weight.data = w.clone()
    if best_s is None:
        raise FloatingPointError("AWQ's scale search found no finite loss")
    return best_s


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int | None, quantize, n_grid: int,
                max_shrink: float) -> torch.Tensor:
    """``auto_clip_layer`` (auto_clip.py:10-63): w (out, in), x (tokens, in) -> max_val (out, groups, 1)."""
    g = group_size or w.shape[1]
    # x (N, C) -> (1, N, C // g, g), evenly strided to about CLIP_TOKENS tokens; w -> (out, 1, C // g, g)
    x = x.reshape(1, x.shape[0], -1, g)
    x = x[:, 0::max(1, x.shape[1] // CLIP_TOKENS)]
    w = w.reshape(w.shape[0], 1, -1, g)
    best_all = []
    for r in range(0, w.shape[0], ROWS_PER_CHUNK):
        wb = w[r:r + ROWS_PER_CHUNK]
        org_max = wb.abs().amax(dim=-1, keepdim=True)                   # (rows, 1, groups, 1)
        # llm-awq: torch.ones_like(org_max) * 1e9, which is inf in float16 (full_like(1e9) raises there)
        best, min_err = org_max.clone(), torch.ones_like(org_max) * 1e9
        org_out = (x * wb).sum(dim=-1)                                  # (rows, tokens, groups)
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            q = quantize(torch.clamp(wb, -max_val, max_val))
            err = ((x * q).sum(dim=-1) - org_out).pow(2).mean(dim=1).view(min_err.shape)
            better = err < min_err
            min_err[better], best[better] = err[better], max_val[better]
        best_all.append(best)
    return torch.cat(best_all).squeeze(1)


@torch.no_grad()
def apply_clip(fc, max_val: torch.Tensor) -> None:
    """``apply_clip`` (auto_clip.py:86-98)."""
    max_val = max_val.to(device=fc.weight.device, dtype=fc.weight.dtype)
    shape = fc.weight.shape
    w = fc.weight.data.reshape(*max_val.shape[:2], -1)
    fc.weight.data = torch.clamp(w, -max_val, max_val).reshape(shape)


def apply_awq(model, result: dict) -> None:
    """``apply_awq`` (pre_quant.py:218-220): every scale folded, then every clip applied. A result
    read from a file (``source``) is first checked against the model's modules."""
    if result.get("source"):
        published.check_awq(model, result, f"{published.KEY}={result['source']}", type(model).__name__,
                            fold.NORMS)
    modules = dict(model.named_modules())
    for prev, names, s in result["scale"]:
        fold.fold_into(modules[prev], [modules[n] for n in names], s)
    for name, max_val in result["clip"]:
        apply_clip(modules[name], max_val)


def check(cfg) -> None:
    p, b = cfg.method, Bits.from_config(cfg)
    check_zero_point(cfg)
    # types and ranges are the schema's (qeval.schema.nodes); the open bound is here
    if p.max_shrink == 1:
        raise ConfigError(f"method.max_shrink={p.max_shrink}: allowed: a number in [0, 1)")
    refuse_other_targets(cfg, "awq")
    if p.get("scales_file") is not None and b.w < 16:
        read_scales_file(p.scales_file)     # before any weights load


def read_scales_file(path) -> dict:
    """An llm-awq ``awq_cache`` file as this method's result (structure checked)."""
    return published.awq_entries(published.load(path, published.AWQ_SHAPE), path) | {"source": str(path)}


def calibration_identity(cfg) -> dict:
    ident = default_identity(cfg)
    ident["method"].pop("scales_file", None)    # a computed result never depends on it
    return ident


def check_architecture(cfg, arch) -> None:
    fold.check_architecture(cfg, arch, "awq")


class AWQWeight(RoundWeight, Calibrated):
    """Round-to-nearest weights in groups of ``w_group_size``, after the searched scales and clips."""

    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs, Granularity(axis=-1, group_size=knobs.w_group_size))

    def _pseudo_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """``pseudo_quantize_tensor`` in groups along the last dimension (the search's quantizer)."""
        r = self.rounding
        return fake_quantize(w, r.bits, -1, None if w.dim() == 4 else self.knobs.w_group_size,
                             r.symmetric, None, r.zero_point)

    @torch.no_grad()
    def calibrate(self, model, samples):
        p = self.params
        kind = model.config.get_text_config().model_type
        prefix, layers = decoder_layers(model)
        inputs = first_layer_inputs(model, samples)
        result = {"scale": [], "clip": []}
        kept = resolved(self.knobs.w_keep, len(layers))
        for i, layer in enumerate(layers):
            if i in kept:   # w_keep_layers: neither scaled, clipped nor quantized
                inputs = run_layer(layer, inputs)
                continue
            lins, name = linears(layer), f"{prefix}.{i}."
            feats = {n: [] for n in lins}
            with watching(lins, lambda n, x, f=feats: f[n].append(x)):
                outputs = run_layer(layer, inputs)          # the next layer's inputs: full precision
            found = []
            for g in (fold.groups(layer, kind) if p.auto_scale else []):
                block = layer.get_submodule(g.inspect or g.linears[0])
                kwargs = [kw if g.layer_kwargs else {} for _, kw in inputs]
                fcs = [layer.get_submodule(n) for n in g.linears]
                found.append((g, search_scale(block, fcs, feats[g.linears[0]], kwargs, self._pseudo_quantize, p.n_grid)))
            for g, s in found:                              # apply_scale, inputs divided for the clip
                fold.fold(layer, g, s)
                for n in g.linears:
                    feats[n] = [x / s.to(x.dtype) for x in feats[n]]
                result["scale"].append((name + g.prev, tuple(name + n for n in g.linears), s.cpu()))
            for n, fc in (lins.items() if p.auto_clip else []):
                if any(k in n for k in NO_CLIP):
                    continue
                x = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats[n]])
                max_val = search_clip(fc.weight.data, x, self.knobs.w_group_size, self._pseudo_quantize, p.n_grid,
                                      p.max_shrink)
                apply_clip(fc, max_val)
                result["clip"].append((name + n, max_val.cpu()))
            inputs = outputs
        return result

    def apply_calibration(self, model, result) -> None:
        apply_awq(model, result)


AWQ = Spec("awq", {WEIGHT: AWQWeight}, calibrates=True, check=check, check_model=check_weight_groups,
           check_architecture=check_architecture, calibration_identity=calibration_identity,
           read_scales_file=read_scales_file)
