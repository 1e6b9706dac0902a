"""Round-to-nearest for one target, as a small frozen value: its number format, bits, groups,
symmetry and zero point. Every round-to-nearest part (:mod:`qeval.methods.round`) holds one per
tensor it quantizes, and the packed kernels read their layout from the weight's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qeval.quant.formats import INT, Format
from qeval.quant.granularity import Granularity
from qeval.quant.primitives import FULL_PRECISION_BITS


@dataclass(frozen=True)
class Rounding:
    target: str                 # w | a | kv: which of a format's per-target conventions apply (NVFP4's scale)
    bits: int
    gran: Granularity
    fmt: Format = INT
    symmetric: bool = False
    zero_point: str = "real"    # the grid's zero (qeval.quant.primitives.ZERO_POINTS)

    @property
    def quantizes(self) -> bool:
        return self.bits < FULL_PRECISION_BITS

    def __call__(self, x: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` fake-quantized: integers or FP8 in ``gran``'s groups, a block format in its own
        blocks; ``exclude`` (True where padding) is kept out of the statistics; the identity at 16
        bits."""
        if not self.quantizes:
            return x
        return self.fmt.fake_quantize(x, self.target, self.bits, self.gran, self.symmetric, exclude, self.zero_point)

    def packed_bytes(self, shape: torch.Size) -> int:
        """Bytes a packed layout of a tensor of ``shape`` needs (formula, not a measurement)."""
        fmt = self.fmt if self.quantizes else INT
        return fmt.packed_bytes(shape, self.target, self.bits, self.gran, self.symmetric)

    def encode_fp8(self, x: torch.Tensor, exclude: torch.Tensor | None = None):
        """(float8 codes, float32 scale) that :func:`qeval.quant.formats.fp8.decode` turns into
        exactly ``self(x, exclude)`` (a stored FP8 format only)."""
        return self.gran.encode_fp8(x, self.fmt.name, exclude)

    def scale_label(self) -> str | None:
        """Where the scales sit, for the row: a block format's own blocks (``block32 e8m0``), else
        the groups (``per_channel``, ``per_token``, ``per_tensor``, ``group128``), with ``fp32``
        appended for FP8's float32 scales; None at 16 bits."""
        if not self.quantizes:
            return None
        g = self.gran
        label = (f"group{g.group_size}" if g.group_size else "per_tensor" if g.per_sequence or g.axis is None
                 else "per_channel" if self.target == "w" or g.axis != -1 else "per_token")
        return self.fmt.scale_label(self.target, label)
