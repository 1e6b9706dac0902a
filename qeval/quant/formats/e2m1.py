"""FP4 E2M1, the element of MXFP4 and NVFP4 (OCP MX spec v1.0 §5.3.3).

| code (S.EE.M) | 0.00.0 | 0.00.1 | 0.01.0 | 0.01.1 | 0.10.0 | 0.10.1 | 0.11.0 | 0.11.1 |
| ------------- | ------ | ------ | ------ | ------ | ------ | ------ | ------ | ------ |
| value         | 0      | 0.5    | 1      | 1.5    | 2      | 3      | 4      | 6      |

Exponent bias 1, one mantissa bit, 0.00.1 the only subnormal, no infinity and no NaN; the sign bit
(bit 3) negates. The magnitude's three bits are the value's index in the table, so a code is
``sign << 3 | index``.

Rounding is to nearest, ties to the even code (mantissa bit 0), and saturating: a magnitude above
6 becomes 6 (the spec's conversion, §6.3). Within a binade the grid is evenly spaced, so a value
is rounded by counting steps of that binade with ``torch.round`` (ties to even): the count's
parity is the mantissa bit's (the binade starts at an even count), so "nearest even count" is
"nearest even code".
"""

from __future__ import annotations

import torch

GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MAX = 6.0
EMAX = 2          # exponent of the largest normal, 6 = 1.5 * 2**2
SIGN = 8


def round_to_grid(y: torch.Tensor) -> torch.Tensor:
    """float32 -> float32 on the E2M1 grid (nearest, ties to even, saturating at ±6; NaN stays)."""
    a = y.abs().clamp(max=MAX)
    # frexp: a = m * 2**e with m in [0.5, 1), so floor(log2 a) = e - 1, exactly (0 gives e = 0)
    _, e = torch.frexp(a)
    # step of a's binade: 0.5 in [0, 2) (subnormal and first normal binade), 1 in [2, 4), 2 in [4, 6]
    step = torch.ldexp(torch.ones_like(a), (e - 1).clamp(min=0) - 1)
    return torch.copysign(torch.round(a / step) * step, y)


def to_codes(v: torch.Tensor) -> torch.Tensor:
    """Values already on the grid -> uint8 codes ``sign << 3 | index`` (sign kept on -0)."""
    grid = torch.tensor(GRID, dtype=torch.float32, device=v.device)
    # NaN sorts past the grid: clamp so it still makes a valid code (its block's scale is NaN)
    index = torch.searchsorted(grid, v.abs().contiguous()).clamp(max=len(GRID) - 1)
    return (index + SIGN * torch.signbit(v)).to(torch.uint8)


def from_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> float32 values."""
    grid = torch.tensor(GRID, dtype=torch.float32, device=codes.device)
    c = codes.long()
    mag = grid[c & 7]
    return torch.where(c & SIGN != 0, -mag, mag)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2n) uint8 codes -> (..., n) bytes, the even element in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)
