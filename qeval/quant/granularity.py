"""Where min/max statistics are taken, as small frozen values (torchao's ``granularity.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qeval.quant.primitives import FULL_PRECISION_BITS, fake_quantize


@dataclass(frozen=True)
class Granularity:
    """Groups of ``group_size`` along ``axis``.

    ``axis=None`` is one group for the whole tensor, or per sequence when ``per_sequence`` is set
    (K/V: a batch never shares statistics, so batched and per-sequence runs agree).
    """

    axis: int | None = -1
    group_size: int | None = None
    per_sequence: bool = False

    def apply(self, x: torch.Tensor, bits: int, symmetric: bool,
              exclude: torch.Tensor | None = None, zero_point: str = "real") -> torch.Tensor:
        """Fake-quantize ``x`` with these groups (``zero_point``: see :mod:`qeval.quant.primitives`)."""
        if bits >= FULL_PRECISION_BITS:
            return x
        if self.per_sequence:
            # (B, ...) -> (B, n): one group per sequence
            ex = None if exclude is None else exclude.expand_as(x).reshape(x.shape[0], -1)
            out = fake_quantize(x.reshape(x.shape[0], -1), bits, -1, None, symmetric, ex, zero_point)
            return out.reshape(x.shape)
        ex = None if exclude is None else exclude.expand_as(x)
        return fake_quantize(x, bits, self.axis, self.group_size, symmetric, ex, zero_point)

    def n_groups(self, shape: torch.Size) -> int:
        numel = shape.numel()
        if self.per_sequence:
            return shape[0]
        if self.axis is None:
            return 1
        return numel // (self.group_size or shape[self.axis])
