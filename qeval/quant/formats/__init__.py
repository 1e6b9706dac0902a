"""Number formats: how one quantized number is stored, chosen per target (``w_format``,
``a_format``, ``kv_format``) independently of the method. One module per family:
:mod:`.fp8`, :mod:`.mx` (with :mod:`.e2m1`, the FP4 element), :mod:`.nvfp4`.

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

import torch

from qeval.quant.formats import fp8, mx, nvfp4

INT = "int"
FORMATS = (INT, "fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp4", "nvfp4")
ELEMENT_BITS = {"fp8_e4m3": 8, "fp8_e5m2": 8, "mxfp8": 8, "mxfp4": 4, "nvfp4": 4}
# the formats whose blocks are their own grouping, and each block's scale
BLOCKS = {"mxfp8": mx.BLOCK, "mxfp4": mx.BLOCK, "nvfp4": nvfp4.BLOCK}
BLOCK_SCALES = {"mxfp8": "e8m0", "mxfp4": "e8m0", "nvfp4": "e4m3"}
# the formats torch has a dtype for, so a tensor can hold them for real
STORED = tuple(fp8.DTYPES)


def bits_per_element(fmt: str, bits: float) -> float:
    """Storage per element a figure places a format at: a block format's element plus its 8-bit
    block scale shared by the block (mxfp4 4.25, mxfp8 8.25, nvfp4 4.5; NVFP4's one float32 per
    tensor, sequence or token is left out); ``bits`` for int and FP8, whose scale belongs to the
    method's group as an integer's does."""
    return ELEMENT_BITS[fmt] + 8 / BLOCKS[fmt] if fmt in BLOCKS else bits


def element_bits(fmt: str, bits: int) -> int:
    """Bits per element of a target: ``bits`` for ``int``, the format's own width otherwise."""
    return bits if fmt == INT else ELEMENT_BITS[fmt]


# NVFP4's float32 second-level scale: the dimensions that get one each (:mod:`.nvfp4`), by target
TENSOR_SCALE_DIMS = {"w": (), "a": (0,), "kv": (0, 2)}
TENSOR_SCALE_LABELS = {"w": "tensor", "a": "sequence", "kv": "token"}


def fake_quantize_blocks(x: torch.Tensor, fmt: str, target: str) -> torch.Tensor:
    """A block format along the last axis of a ``target`` (w | a | kv) tensor."""
    if fmt == "nvfp4":
        return nvfp4.fake_quantize(x, TENSOR_SCALE_DIMS[target])
    return mx.fake_quantize(x, fmt)


def block_packed_bytes(shape: torch.Size, fmt: str, target: str) -> int:
    """Bytes of a block format's packed layout of a ``target`` tensor of ``shape``: codes plus block
    scales (plus NVFP4's tensor scales)."""
    if fmt == "nvfp4":
        n_scales = 1
        for d in TENSOR_SCALE_DIMS[target]:
            n_scales *= shape[d]
        return nvfp4.packed_bytes(shape.numel(), n_scales)
    return mx.packed_bytes(shape.numel(), fmt)


def block_scale_granularity(fmt: str, target: str) -> str:
    """Row label of a block format's scales: ``block32 e8m0``, ``block16 e4m3 + token fp32``..."""
    label = f"block{BLOCKS[fmt]} {BLOCK_SCALES[fmt]}"
    if fmt == "nvfp4":
        label += f" + {TENSOR_SCALE_LABELS[target]} fp32"
    return label
