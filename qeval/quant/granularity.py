"""Where min/max statistics are taken, as small frozen values (torchao's ``granularity.py``).

The same groups serve the integer quantizer (:meth:`Granularity.apply`) and FP8's per-group scale
(:meth:`Granularity.apply_fp8`, :meth:`Granularity.encode_fp8`, :mod:`qeval.quant.formats.fp8`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qeval.quant.formats import fp8
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

    def _flat(self, x: torch.Tensor, exclude: torch.Tensor | None):
        """(x, exclude, axis, group_size) as the quantizers see them: per sequence is one group of
        each (B, n) row."""
        ex = None if exclude is None else exclude.expand_as(x)
        if self.per_sequence:
            # (B, ...) -> (B, n): one group per sequence
            return (x.reshape(x.shape[0], -1), None if ex is None else ex.reshape(x.shape[0], -1), -1, None)
        return x, ex, self.axis, self.group_size

    def apply_fp8(self, x: torch.Tensor, fmt: str, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantize ``x`` to FP8 ``fmt`` with one float32 scale per group."""
        flat, ex, axis, g = self._flat(x, exclude)
        return fp8.fake_quantize(flat, fmt, axis, g, ex).reshape(x.shape)

    def encode_fp8(self, x: torch.Tensor, fmt: str,
                   exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scale) to hold: float8 codes in ``x``'s shape and a float32 scale of shape
        ``(..., n)`` for n groups along the last axis, leading dimensions broadcasting
        (:func:`qeval.quant.formats.fp8.decode` inverts it). Groups along the last axis, per
        tensor or per sequence only; anything else has no such layout."""
        if not (self.per_sequence or self.axis in (None, -1, x.dim() - 1)):
            raise ValueError(f"{self}: FP8 storage holds scales per tensor, sequence or last-axis group")
        flat, ex, axis, g = self._flat(x, exclude)
        q = fp8.quantize(flat, fmt, axis, g, ex)
        if self.per_sequence or axis is None:
            # (B or 1, 1, 1) -> (B or 1, 1, ..., 1): one scale broadcast over the whole row
            return q.codes.reshape(x.shape), q.scale.reshape(-1, *([1] * (x.dim() - 1)))
        # (..., n, g) -> codes (..., n * g), scale (..., n)
        return q.codes.reshape(x.shape), q.scale.squeeze(-1)
