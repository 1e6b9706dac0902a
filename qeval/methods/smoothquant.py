"""SmoothQuant (Xiao et al., arXiv 2211.10438): migrate activation outliers into the weights with a
per-input-channel scale ``s`` folded into the norm before the Linears, then quantize weights and
activations (WA).

After mit-han-lab/smoothquant (commit c61476d): ``smoothquant/calibration.py`` ``get_act_scales``
(``act_scales`` = per input channel max |x| of every Linear over the calibration samples, the
full-precision model, float32) and ``smoothquant/smooth.py`` ``smooth_ln_fcs`` /
``smooth_ln_fcs_llama_like`` / ``smooth_lm`` (``s = act_scales ** alpha / weight_max ** (1 - alpha)``
clamped at 1e-5, ``weight_max`` the per-column max |W| over the Linears sharing the input, also
clamped at 1e-5, computed in the weights' dtype; the norm's weight and bias divided by ``s``, the
Linears' columns multiplied by it; q/k/v after the attention norm, gate/up after the MLP norm (OPT:
fc1)). The result saved for reuse is ``act_scales``, as the authors ship them; ``alpha`` is applied
when it is folded, so one calibration serves every alpha and bit width.

``method.scales_file`` applies a published file instead of calibrating
(:mod:`qeval.calibration.published`): the authors' ``act_scales/*.pt`` (the same dict, folded with
``alpha`` as above) or Qllm-Eval's rep file in llm-awq's format, whose scales already hold their
alpha and are folded as they are (``method.alpha`` is then unused; the row's
``calibration.format`` says which).

The quantization after smoothing is ``method=uniform``'s WA (per-channel weights, per-token
activations, ``zero_point`` and ``symmetric`` as there), so a row differs from uniform's only by
the smoothing. The authors' own fake quantizer (``fake_quant.py``: symmetric absmax, per channel
and per token) is ``method.symmetric=true``. Only Linear inputs are quantized: the attention
matmul inputs SmoothQuant's O1-O3 levels also quantize are not.
"""

from __future__ import annotations

import torch
from torch import nn

from qeval.calibration import fold, published
from qeval.calibration.layers import decoder_layers, watching
from qeval.errors import ConfigError
from qeval.methods.awq import apply_awq
from qeval.methods.base import Bits
from qeval.methods.parts import TransformPart
from qeval.methods.round import RoundAct, RoundWeight
from qeval.methods.spec import Spec
from qeval.methods.uniform import A_GRANULARITIES, W_GRANULARITIES, check_zero_point
from qeval.recipe.slot_names import ACT, TRANSFORM, WEIGHT

# smooth.py: both clamps
SCALE_FLOOR = 1e-5


@torch.no_grad()
def smoothing_scales(act_scales: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``smooth_ln_fcs`` (smooth.py:27-39): (in,) scales in the weights' dtype."""
    dtype, device = weights[0].dtype, weights[0].device
    act = act_scales.to(device=device, dtype=dtype)
    w_max = torch.cat([w.abs().max(dim=0, keepdim=True)[0] for w in weights]).max(dim=0)[0].clamp(min=SCALE_FLOOR)
    return (act.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=SCALE_FLOOR)


@torch.no_grad()
def act_scales(model, samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``get_act_scales`` (calibration.py:13-51): per Linear, max |input| per channel, float32."""
    out: dict[str, torch.Tensor] = {}

    def see(name, x):
        cur = x.reshape(-1, x.shape[-1]).abs().amax(0).float().cpu()
        out[name] = torch.maximum(out[name], cur) if name in out else cur

    lins = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    device = model.get_input_embeddings().weight.device
    with watching(lins, see):
        for ids in samples:
            model(input_ids=ids.to(device), use_cache=False)
    return out


def check(cfg) -> None:
    check_zero_point(cfg)
    b = Bits.from_config(cfg)
    if min(b.k, b.v) < 16:
        raise ConfigError(f"kv_bits={min(b.k, b.v)}: method smoothquant quantizes weights and activations; "
                          f"allowed: 16")
    if cfg.method.get("scales_file") is not None and min(b.w, b.a) < 16:
        read_scales_file(cfg.method.scales_file)     # before any weights load


def read_scales_file(path) -> dict:
    """The authors' act_scales, or Qllm-Eval's llm-awq-format smoothing scales, as this method's
    result (structure checked)."""
    allowed = f"{published.ACT_SHAPE}, or {published.AWQ_SHAPE}"
    obj = published.load(path, allowed)
    if published.kind(obj) == published.AWQ:
        return published.awq_entries(obj, path) | {"source": str(path)}
    return {"act_scales": published.act_scales(obj, path), "source": str(path)}


def check_architecture(cfg, arch) -> None:
    fold.check_architecture(cfg, arch, "smoothquant")


def calibration_identity(cfg) -> dict:
    # act_scales are statistics of the full-precision model: neither alpha nor the bits (nor a
    # scales_file, which replaces them) enter them
    return {"method": "smoothquant", "statistic": "max |x| per input channel of every Linear"}


class Smoothing(TransformPart):
    """Migrates activation outliers into the weights: per input channel, scales from calibration
    divide the inputs (folded into the norm before) and multiply the weights."""

    def calibrate(self, model, samples):
        result = {"act_scales": act_scales(model, samples)}
        self.apply_calibration(model, result)
        return result

    @torch.no_grad()
    def apply_calibration(self, model, result) -> None:
        """``smooth_lm`` (smooth.py:74-160), Llama/Mistral/Qwen2 and OPT branches; a file in llm-awq's
        format is applied as ``apply_awq`` does."""
        if "scale" in result:
            apply_awq(model, result)
            return
        kind = model.config.get_text_config().model_type
        prefix, layers = decoder_layers(model)
        if result.get("source"):
            needed = [f"{prefix}.{i}.{g.linears[0]}" for i, layer in enumerate(layers)
                      for g in fold.groups(layer, kind, norms_only=True)]
            published.check_act_scales(model, result["act_scales"], needed,
                                       f"{published.KEY}={result['source']}", type(model).__name__)
        for i, layer in enumerate(layers):
            for g in fold.groups(layer, kind, norms_only=True):
                fcs = [layer.get_submodule(n).weight for n in g.linears]
                act = result["act_scales"][f"{prefix}.{i}.{g.linears[0]}"]
                fold.fold(layer, g, smoothing_scales(act, fcs, self.params.alpha))


class SmoothQuantWeight(RoundWeight):
    """Weights per output channel, as the authors' W8A8 linear."""

    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs, W_GRANULARITIES["per_channel"])


class SmoothQuantAct(RoundAct):
    """Activations per token, as the authors' W8A8 linear."""

    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs, A_GRANULARITIES["per_token"])


SMOOTHQUANT = Spec("smoothquant", {TRANSFORM: Smoothing, WEIGHT: SmoothQuantWeight, ACT: SmoothQuantAct},
                   calibrates=True, check=check, check_architecture=check_architecture,
                   calibration_identity=calibration_identity, read_scales_file=read_scales_file)
