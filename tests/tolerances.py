"""Where the tests' numeric tolerances come from.

Two fp32 evaluations of the same network that differ only in the order of their sums (a Triton
kernel against torch, a fused path against a reference) differ by rounding. A length-n sum in
fp32, in any order, is within ``n * eps`` (relative to the sum of magnitudes) of the exact sum
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 4.4), so two orders differ
by at most twice that; stacked layers add their errors. Those are worst-case bounds: measured gaps
are orders of magnitude smaller, and nothing here depends on the CPU or library version.

A quantizer is not continuous: an input that sits within rounding of a code boundary can land one
code apart on two paths. That is a *flip*, one element moved by one quantization step, and no
rounding tolerance covers it. Tests that compare end-to-end runs detect flips and judge the
steps after one against the quantization error instead (``packed_backend_helpers``).
"""

from __future__ import annotations

import torch

FP32_EPS = torch.finfo(torch.float32).eps


def sum_rounding(n: int, magnitude: float, depth: int = 1) -> float:
    """Largest difference between two fp32 evaluations of ``depth`` stacked length-``n`` sums whose
    terms total ``magnitude``: ``2 * depth * n * eps * magnitude``."""
    return 2 * depth * n * FP32_EPS * magnitude


def network_rounding(config, magnitude: float) -> float:
    """The same bound for the logits of a decoder: each layer sums over at most the widest of its
    dimensions twice (attention, MLP), plus the LM head."""
    text = config.get_text_config()
    n = max(text.hidden_size, getattr(text, "intermediate_size", None) or 4 * text.hidden_size)
    return sum_rounding(n, magnitude, depth=2 * text.num_hidden_layers + 1)
