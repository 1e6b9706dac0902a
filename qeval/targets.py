"""W and WA targets: every ``nn.Linear`` except the LM head becomes a ``QuantLinear``."""

from __future__ import annotations

import torch
from torch import nn
from transformers.quantizers.base import get_keys_to_not_convert

from qeval.methods.base import Method


class QuantLinear(nn.Module):
    """A Linear whose weight was quantized once and whose input is quantized per call (WA)."""

    def __init__(self, linear: nn.Linear, method: Method, quantize_input: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(method.quantize_weight(linear.weight.data), requires_grad=False)
        self.bias = linear.bias
        self.method = method
        self.quantize_input = quantize_input
        self.packed_bytes = method.weight_packed_bytes(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_input:
            x = self.method.quantize_activation(x)
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        b = self.method.bits
        return f"{self.in_features}, {self.out_features}, w_bits={b.w}, a_bits={b.a if self.quantize_input else 16}"


def quantize_linears(model: nn.Module, method: Method) -> dict:
    """Swap Linears in place (W when w_bits < 16, WA when a_bits < 16); returns byte counts."""
    if method.bits.w >= 16 and method.bits.a >= 16:
        return {}
    skip = set(get_keys_to_not_convert(model))
    swapped, held, packed = 0, 0, 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.split(".")[-1] in skip or name in skip:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = QuantLinear(module, method, quantize_input=method.bits.a < 16)
        setattr(parent, child, q)
        swapped += 1
        held += q.weight.nbytes
        packed += q.packed_bytes
    if swapped == 0:
        raise ValueError("no nn.Linear layers found to quantize in this model")
    return {"linears_quantized": swapped, "weight_bytes_held": held, "weight_bytes_packed": packed}
