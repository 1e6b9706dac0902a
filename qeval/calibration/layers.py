"""Running a causal LM one decoder layer at a time, as GPTQ (``llama.py`` ``llama_sequential``) and
AWQ (``awq/quantize/pre_quant.py`` ``run_awq``) do with their ``Catcher``: each sample is run up to
the first decoder layer, whose inputs (hidden states and keyword arguments: mask, positions,
rotary embeddings) are kept; every layer is then run on its own inputs, with hooks that see what
each Linear receives. Samples run one at a time (batch 1, no padding), so nothing here depends
on a sample's length.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

LayerInput = tuple[torch.Tensor, dict]   # (hidden states (1, T, C), the layer's keyword arguments)


def decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """(qualified name, layers): the ModuleList of ``num_hidden_layers`` decoder layers of one class."""
    n = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and len({type(c) for c in module}) == 1:
            return name, module
    raise ValueError(f"{type(model).__name__}: no list of its {n} decoder layers found")


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The layer's Linears by name relative to it, in registration order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


class _Stop(Exception):
    """Raised by the first layer's hook: nothing after it needs to run."""


@torch.no_grad()
def first_layer_inputs(model, samples: list[torch.Tensor]) -> list[LayerInput]:
    """Per sample ((1, T) ids), what the first decoder layer is called with."""
    _, layers = decoder_layers(model)
    got: list[LayerInput] = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        got.append((hidden, dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    device = model.get_input_embeddings().weight.device
    try:
        for ids in samples:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return got


def hidden(out) -> torch.Tensor:
    """A layer's (or attention block's) output hidden states, whether or not it returns a tuple."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    """The layer's outputs as the next layer's inputs (same keyword arguments)."""
    return [(hidden(layer(h, **kw)), kw) for h, kw in inputs]


@contextmanager
def watching(modules: dict[str, nn.Module], see):
    """Inside, every call of ``modules[name]`` calls ``see(name, x)`` with its input."""
    hooks = [m.register_forward_hook(lambda _m, args, _out, name=name: see(name, args[0]))
             for name, m in modules.items()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def qualified_names(model, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Relative name -> the module's name in ``model``."""
    full = {id(m): n for n, m in model.named_modules()}
    return {name: full[id(m)] for name, m in modules.items()}
