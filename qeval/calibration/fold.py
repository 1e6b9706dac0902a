"""Where per-input-channel scales fold into a decoder layer without changing its function: divide
the output channels of the op that feeds some Linears (a norm's weight and bias, or a Linear's
output rows) by ``s`` and multiply those Linears' input columns by ``s``.

The groups are AWQ's (mit-han-lab/llm-awq ``awq/quantize/auto_scale.py`` ``auto_scale_block``,
Llama/Qwen2 and OPT branches): the norm before attention -> q, k, v; v -> o (only when their
weights have the same shape: without GQA); the norm before the MLP -> gate, up (OPT: fc1); up ->
down (OPT: fc1 -> fc2, through ReLU, which commutes with a positive scale). SmoothQuant
(mit-han-lab/smoothquant ``smoothquant/smooth.py`` ``smooth_lm``) folds into the two norms only.
The folds are ``scale_ln_fcs`` / ``smooth_ln_fcs`` and ``scale_fc_fc``: the same operations in the
weights' dtype.

Supported: Llama, Mistral, Qwen2 (RMSNorm ``weight * x``) and pre-norm OPT (LayerNorm). Gemma's
RMSNorm multiplies by ``1 + weight``, which a division does not fold into, and a post-norm model
(OPT-350m) has no norm before its Linears; both are refused before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qeval.errors import ConfigError


@dataclass(frozen=True)
class ScaleGroup:
    prev: str                    # the op whose output channels feed the Linears: a norm or a Linear
    linears: tuple[str, ...]     # the Linears reading it (names within the decoder layer)
    inspect: str | None = None   # AWQ: the module whose output the search measures (None: the Linear)
    layer_kwargs: bool = False   # the inspected module is attention: it takes the layer's keyword arguments


LLAMA = (ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    "self_attn", True),
         ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
         ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
         ScaleGroup("mlp.up_proj", ("mlp.down_proj",)))
OPT = (ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "self_attn", True),
       ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",)),
       ScaleGroup("final_layer_norm", ("fc1",)),
       ScaleGroup("fc1", ("fc2",)))
# Qwen3 is Llama's block with a norm on each head's q and k after their projections, which a scale
# on the projections' inputs does not reach
ARCHITECTURES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "opt": OPT}
# norms whose forward is ``weight * normalized (+ bias)``, so dividing weight (and bias) by s folds
NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "LayerNorm")


def check_architecture(cfg, arch, method: str) -> None:
    """One line for a model whose norms the scales cannot fold into."""
    text = arch.get_text_config()
    kind = text.model_type
    if kind not in ARCHITECTURES:
        raise ConfigError(f"model={cfg.model.name}: method {method} folds scales into the norms of "
                          f"{', '.join(ARCHITECTURES)} decoder layers; this model is {kind}")
    if kind == "opt" and not getattr(text, "do_layer_norm_before", True):
        raise ConfigError(f"model={cfg.model.name}: method {method} needs a norm before the Linears; this OPT "
                          f"normalizes after them (do_layer_norm_before=false)")


def groups(layer: nn.Module, model_type: str, norms_only: bool = False) -> list[ScaleGroup]:
    """The layer's scale groups: v -> o only where the shapes match (AWQ's GQA rule)."""
    out = []
    for g in ARCHITECTURES[model_type]:
        prev = layer.get_submodule(g.prev)
        if isinstance(prev, nn.Linear):
            gqa = g.prev.endswith("v_proj") and prev.weight.shape != layer.get_submodule(g.linears[0]).weight.shape
            if norms_only or gqa:
                continue
        elif type(prev).__name__ not in NORMS:
            raise ValueError(f"{g.prev} is a {type(prev).__name__}; scales fold into {', '.join(NORMS)} only")
        out.append(g)
    return out


def fold(layer: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """``group``'s prev output channels / s, its Linears' input columns * s."""
    fold_into(layer.get_submodule(group.prev), [layer.get_submodule(n) for n in group.linears], s)


@torch.no_grad()
def fold_into(prev: nn.Module, fcs: list[nn.Linear], s: torch.Tensor) -> None:
    """``prev`` output channels / s, the Linears' input columns * s (in their dtype)."""
    s = s.to(device=prev.weight.device, dtype=prev.weight.dtype)
    if isinstance(prev, nn.Linear):
        # scale_fc_fc: the last len(s) output rows (a fused qkv would hold v last)
        prev.weight[-s.numel():].div_(s.view(-1, 1))
        if prev.bias is not None:
            prev.bias.div_(s.view(-1))
    else:
        prev.weight.div_(s)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s)
    for fc in fcs:
        fc.weight.mul_(s.view(1, -1))
