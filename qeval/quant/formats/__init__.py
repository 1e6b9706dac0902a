"""Number formats: how one quantized number is stored, chosen per target (``w_format``,
``a_format``, ``kv_format``) independently of the method. One module per family:
:mod:`.fp8`, :mod:`.mx` (with :mod:`.e2m1`, the FP4 element), :mod:`.nvfp4`; here, the table of
:class:`Format` objects (:data:`FORMATS`), the one place a format is chosen by its name. Everything
else asks the object: its width, its block, its bits per element, how it rounds and packs, how
its scales are labelled in a row.

| format   | element            | element bits | grouping                 | scale per group          | bits per element        | held as                  |
| -------- | ------------------ | ------------ | ------------------------ | ------------------------ | ----------------------- | ------------------------ |
| int      | integer, ``*_bits``| ``*_bits``   | the method's             | fp16 scale (+ zero)      | b + 16 or 32 / group    | dequantized (fake)       |
| fp8_e4m3 | FP8 E4M3 "fn"      | 8            | the method's             | float32 ``amax / 448``   | 8 + 32 / group          | ``torch.float8_e4m3fn``  |
| fp8_e5m2 | FP8 E5M2           | 8            | the method's             | float32 ``amax / 57344`` | 8 + 32 / group          | ``torch.float8_e5m2``    |
| mxfp8    | FP8 E4M3           | 8            | blocks of 32 (its own)   | E8M0 power of two        | 8.25                    | dequantized (fake)       |
| mxfp4    | FP4 E2M1           | 4            | blocks of 32 (its own)   | E8M0 power of two        | 4.25                    | dequantized (fake)       |
| nvfp4    | FP4 E2M1           | 4            | blocks of 16 (its own)   | E4M3, times a float32 (W: per tensor, A: per sequence, K/V: per token) | 4.5 (+ 32 per float32) | dequantized (fake) |

Sources: OCP 8-bit Floating Point Specification (OFP8) rev. 1.0 for FP8; OCP Microscaling Formats
(MX) Specification v1.0 for MX (§5.3 elements, §5.4.1 the E8M0 scale, §6.3 conversion); NVIDIA's
NVFP4 description (:mod:`.nvfp4`). FP8 K/V scales are dynamic (from each group) by default or
static per layer from calibration (``kv_scale``, :mod:`qeval.calibration.kv_scales`).

Bits and format: a non-integer format fixes its own element width, so ``*_bits`` is either 16
(the default: "the format decides") or equal to that width; anything else is refused. The method's
grouping (``*_granularity``, ``*_group_size``) sets where FP8's scales are taken; the block formats
bring their own 32- or 16-element blocks along the reduction axis, which is their grouping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qeval.quant.formats import fp8, mx, nvfp4
from qeval.quant.primitives import packed_bytes as int_packed_bytes

# NVFP4's float32 second-level scale: the dimensions that get one each (:mod:`.nvfp4`), by target
TENSOR_SCALE_DIMS = {"w": (), "a": (0,), "kv": (0, 2)}
TENSOR_SCALE_LABELS = {"w": "tensor", "a": "sequence", "kv": "token"}


@dataclass(frozen=True)
class Format:
    """A number format. ``element_bits`` None: the run's ``*_bits`` decide (integers); ``block``:
    its own block along the reduction axis (None: the method's groups are its grouping);
    ``stored``: torch has a dtype for it, so a tensor can hold it for real."""

    name: str
    element_bits: int | None = None
    block: int | None = None
    stored: bool = False

    def __str__(self) -> str:
        return self.name

    @property
    def is_integer(self) -> bool:
        return self.element_bits is None

    def width(self, bits: int) -> int:
        """Bits per element of a target: ``bits`` for integers, the format's own width otherwise."""
        return bits if self.element_bits is None else self.element_bits

    def bits_per_element(self, bits: float) -> float:
        """Storage per element a figure places a format at: ``bits`` for int and FP8, whose scale
        belongs to the method's group as an integer's does; a block format's element plus its
        8-bit block scale shared by the block (mxfp4 4.25, mxfp8 8.25, nvfp4 4.5; NVFP4's one
        float32 per tensor, sequence or token is left out)."""
        return bits

    def setting(self, letter: str, bits: int) -> str:
        """How a row's setting names this target: ``W4`` for integers, ``W mxfp4`` otherwise."""
        return f"{letter}{bits}" if self.is_integer else f"{letter} {self.name}"

    def fake_quantize(self, x, target: str, bits: int, gran, symmetric: bool, exclude, zero_point: str):
        """Round-to-nearest of a ``target`` (w | a | kv) tensor in ``gran``'s groups."""
        return gran.apply(x, bits, symmetric, exclude, zero_point)

    def packed_bytes(self, shape: torch.Size, target: str, bits: int, gran, symmetric: bool) -> int:
        return int_packed_bytes(shape.numel(), bits, None, gran.n_groups(shape), symmetric=symmetric)

    def scale_label(self, target: str, groups: str) -> str:
        """Where a target's scales sit, for the row, given the method's ``groups`` label."""
        return groups


@dataclass(frozen=True)
class FP8(Format):
    """FP8 with one float32 scale per group of the method's grouping (:mod:`.fp8`)."""

    def fake_quantize(self, x, target, bits, gran, symmetric, exclude, zero_point):
        return gran.apply_fp8(x, self.name, exclude)

    def packed_bytes(self, shape, target, bits, gran, symmetric):
        return fp8.packed_bytes(shape.numel(), gran.n_groups(shape))

    def scale_label(self, target, groups):
        return f"{groups} fp32"


@dataclass(frozen=True)
class MX(Format):
    """OCP Microscaling: blocks of 32 with an E8M0 power-of-two scale (:mod:`.mx`)."""

    def bits_per_element(self, bits):
        return self.element_bits + 8 / self.block

    def fake_quantize(self, x, target, bits, gran, symmetric, exclude, zero_point):
        return mx.fake_quantize(x, self.name)

    def packed_bytes(self, shape, target, bits, gran, symmetric):
        return mx.packed_bytes(shape.numel(), self.name)

    def scale_label(self, target, groups):
        return f"block{self.block} e8m0"


@dataclass(frozen=True)
class NVFP4(Format):
    """NVFP4: blocks of 16 with an E4M3 scale, times a float32 per tensor, sequence or token
    depending on the target (:mod:`.nvfp4`)."""

    def bits_per_element(self, bits):
        return self.element_bits + 8 / self.block

    def fake_quantize(self, x, target, bits, gran, symmetric, exclude, zero_point):
        return nvfp4.fake_quantize(x, TENSOR_SCALE_DIMS[target])

    def packed_bytes(self, shape, target, bits, gran, symmetric):
        n_scales = 1
        for d in TENSOR_SCALE_DIMS[target]:
            n_scales *= shape[d]
        return nvfp4.packed_bytes(shape.numel(), n_scales)

    def scale_label(self, target, groups):
        return f"block{self.block} e4m3 + {TENSOR_SCALE_LABELS[target]} fp32"


INT = Format("int")
# the table: every format qeval runs, by the name a config gives it
FORMATS: dict[str, Format] = {f.name: f for f in (
    INT,
    FP8("fp8_e4m3", element_bits=8, stored=True),
    FP8("fp8_e5m2", element_bits=8, stored=True),
    MX("mxfp8", element_bits=8, block=mx.BLOCK),
    MX("mxfp4", element_bits=4, block=mx.BLOCK),
    NVFP4("nvfp4", element_bits=4, block=nvfp4.BLOCK),
)}
assert set(fp8.DTYPES) == {n for n, f in FORMATS.items() if f.stored}
NAMES = tuple(FORMATS)
# the formats torch has a dtype for, so a tensor can hold them for real
STORED = tuple(f for f in FORMATS.values() if f.stored)


def lookup(fmt) -> Format:
    """The format a config names (a :class:`Format` passes through); KeyError for an unknown name."""
    return fmt if isinstance(fmt, Format) else FORMATS[fmt]
