"""Number formats against independent derivations: every FP8 code decoded from its bits (OFP8),
E2M1 from its bits (OCP MX §5.3.3), and MX / NVFP4 re-derived here from the specs' words with a
brute-force nearest-value search (no shared code with qeval.quant.formats). torchao, where it is
installed, is a second reference (tests/test_formats_torchao.py).

Rounding is judged exactly: a brute-force search over a format's finite values, nearest first and
ties to the even code, is what "round to nearest even, saturating" means; quantization never
leaves room for a tolerance here.
"""

from __future__ import annotations

import math

import pytest
import torch

from qeval.quant.formats import e2m1, fp8, mx, nvfp4

FP8 = {"fp8_e4m3": (torch.float8_e4m3fn, 4, 3, 7), "fp8_e5m2": (torch.float8_e5m2, 5, 2, 15)}


def decode_fp8_bits(code: int, ebits: int, mbits: int, bias: int, fn: bool) -> float:
    """OFP8: S.E.M with ``bias``; E4M3 "fn" has no infinities and NaN only at S.1111.111; E5M2
    follows IEEE (all-ones exponent: inf when M = 0, NaN otherwise)."""
    s, e, m = code >> (ebits + mbits), (code >> mbits) & ((1 << ebits) - 1), code & ((1 << mbits) - 1)
    top = (1 << ebits) - 1
    if e == top and (not fn or m == (1 << mbits) - 1):
        return math.nan if (fn or m) else (-1) ** s * math.inf
    value = m / 2**mbits * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**mbits) * 2.0 ** (e - bias)
    return (-1) ** s * value


def nearest_even(y: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Each |y| to the nearest of the ascending non-negative ``grid`` (code i = index i), ties to
    the even index, beyond the grid to its largest value; the sign of y kept."""
    # saturating: past the largest value (infinity included) is the largest value
    a = y.abs().double().clamp(max=grid.max().item()).reshape(-1, 1)
    d = (a - grid.double().reshape(1, -1)).abs()
    best = d.min(1, keepdim=True).values
    tied = d == best
    # among the nearest, an even index wins; otherwise the only nearest one
    even = tied & (torch.arange(grid.numel()) % 2 == 0)
    idx = torch.where(even.any(1), even.float().argmax(1), tied.float().argmax(1))
    return torch.copysign(grid[idx].reshape(y.shape).to(y.dtype), y)


def positive_grid(fmt: str) -> torch.Tensor:
    _, ebits, mbits, bias = FP8[fmt]
    vals = [decode_fp8_bits(c, ebits, mbits, bias, fmt == "fp8_e4m3") for c in range(128)]
    return torch.tensor([v for v in vals if math.isfinite(v)], dtype=torch.float64)


@pytest.mark.parametrize("fmt", list(FP8))
def test_every_fp8_code_decodes_as_the_spec_says(fmt):
    dtype, ebits, mbits, bias = FP8[fmt]
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    torch_vals = codes.view(dtype).double().tolist()
    spec = [decode_fp8_bits(c, ebits, mbits, bias, fmt == "fp8_e4m3") for c in range(256)]
    for c, (t, v) in enumerate(zip(torch_vals, spec, strict=True)):
        assert (math.isnan(t) and math.isnan(v)) or t == v, (c, t, v)
    assert max(v for v in spec if math.isfinite(v)) == fp8.MAX[fmt]
    assert sum(math.isnan(v) for v in spec) == (2 if fmt == "fp8_e4m3" else 6)


@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_encoding_is_nearest_even_and_saturating_over_every_code_and_midpoint(fmt):
    """Every representable value, every midpoint between neighbours (a tie), values past the max
    and infinities, at a power-of-two scale (so x / scale is exact): the codes equal the
    brute-force nearest-even value and the formula ``(x/s).clamp(-max, max).to(fp8) * s``."""
    dtype, m = FP8[fmt][0], fp8.MAX[fmt]
    grid = positive_grid(fmt)
    mids = (grid[1:] + grid[:-1]) / 2
    quarter = grid[:-1] + (grid[1:] - grid[:-1]) / 4      # off-tie: must go down
    beyond = torch.tensor([m * 1.01, m * 1.5, m * 4, math.inf], dtype=torch.float64)
    y = torch.cat([grid, mids, quarter, beyond]).float()
    y = torch.cat([y, -y])
    scale = torch.tensor(2.0**-5)
    x = y * scale
    got = fp8.decode(fp8.encode(x, scale, fmt), scale.reshape(1), torch.float32)
    formula = (x / scale).clamp(-m, m).to(dtype).to(torch.float32) * scale
    expected = nearest_even(y, grid.float()) * scale
    assert torch.equal(got, formula)
    assert torch.equal(got, expected), (got != expected).nonzero()[:5]


@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_fake_quantization_per_token_and_per_group_is_the_formula(fmt, dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 64) * torch.logspace(-4, 4, 64)).to(dtype)
    x[1, 2] = 0   # an all-zero token: scale 1, decodes to 0
    m, fdt = fp8.MAX[fmt], FP8[fmt][0]
    for g in (None, 16):
        xg = x.float().unflatten(-1, (64 // (g or 64), g or 64))
        s = xg.abs().amax(-1, keepdim=True) / m
        s = torch.where(s == 0, torch.ones_like(s), s)
        ref = ((xg / s).clamp(-m, m).to(fdt).float() * s).flatten(-2).to(dtype)
        assert torch.equal(fp8.fake_quantize(x, fmt, -1, g), ref)
    assert torch.equal(fp8.fake_quantize(x, fmt, -1)[1, 2], torch.zeros(64, dtype=dtype))


def test_fp8_amax_leaves_excluded_elements_out():
    x = torch.tensor([[1.0, 2.0, 1000.0]])
    out = fp8.fake_quantize(x, "fp8_e4m3", -1, None, exclude=torch.tensor([[False, False, True]]))
    assert out[0, 1] == 2.0 and out[0, 2] == 2.0   # scale from amax 2; the excluded element saturates


# -- E2M1 -----------------------------------------------------------------------------------------

def decode_e2m1_bits(code: int) -> float:
    """§5.3.3: S.EE.M, exponent bias 1, 0.00.1 subnormal (0.5), no inf or NaN."""
    s, e, m = code >> 3, (code >> 1) & 3, code & 1
    value = m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return -value if s else value


E2M1_GRID = torch.tensor([decode_e2m1_bits(c) for c in range(8)])


def test_e2m1_codes_decode_as_the_spec_says():
    assert E2M1_GRID.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    codes = torch.arange(16, dtype=torch.uint8)
    assert e2m1.from_codes(codes).tolist() == [decode_e2m1_bits(c) for c in range(16)]
    assert torch.equal(e2m1.to_codes(e2m1.from_codes(codes)), codes)
    assert torch.equal(e2m1.unpack(e2m1.pack(codes)), codes)


def test_e2m1_rounding_is_nearest_even_and_saturating():
    mids = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2        # every tie: 0.25 0.75 1.25 1.75 2.5 3.5 5
    torch.manual_seed(0)
    y = torch.cat([E2M1_GRID, mids, mids + 1e-6, mids - 1e-6, torch.rand(2000) * 8,
                   torch.tensor([6.5, 7.0, 100.0, math.inf])])
    y = torch.cat([y, -y])
    assert torch.equal(e2m1.round_to_grid(y), nearest_even(y, E2M1_GRID))
    # the ties, spelled out: to the even code
    assert e2m1.round_to_grid(mids).tolist() == [0, 1, 1, 2, 2, 4, 4]


# -- MX, re-derived from the spec -------------------------------------------------------------------

def mx_reference(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """§6.3 per block of 32: X = 2**(floor(log2 amax) - emax_elem), clamped to E8M0's [-127, 127]
    (-127 for an all-zero block); elements nearest-even on the element grid, saturating.
    Returns (biased E8M0 exponents, dequantized values)."""
    emax, grid = (2, E2M1_GRID) if fmt == "mxfp4" else (8, positive_grid("fp8_e4m3").float())
    xb = x.double().reshape(-1, 32)
    bits, out = [], []
    for block in xb:
        amax = block.abs().max().item()
        e = -127 if amax == 0 else max(-127, math.frexp(amax)[1] - 1 - emax)
        bits.append(e + 127)
        out.append(nearest_even((block / 2.0**e).float(), grid).double() * 2.0**e)
    return torch.tensor(bits, dtype=torch.uint8), torch.stack(out).float().reshape(x.shape)


def mx_cases() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4) * 2.0**-3   # E2M1 ties after scaling
    return {
        "random": torch.randn(4, 64),
        "outlier": torch.randn(2, 64).index_put_((torch.tensor([0, 1]), torch.tensor([3, 40])), torch.tensor([900.0, -3e4])),
        "all_zero": torch.zeros(2, 64),
        "tiny": torch.randn(1, 64) * 1e-38,                       # shared exponent clamped at -127
        "power_of_two_amax": torch.tensor([[4.0] + [0.3] * 31, [-8.0] + [1.0] * 31]),
        "just_below_power_of_two": torch.full((1, 32), math.nextafter(8.0, 0.0)),
        "ties": ties.reshape(1, 32),
        "saturating": torch.tensor([[7.5] + [0.1] * 31]),        # amax / X = 7.5 > 6: saturates to 6
    }


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
@pytest.mark.parametrize("case", list(mx_cases()))
def test_mx_matches_the_spec_rederivation(fmt, case):
    x = mx_cases()[case]
    bits, ref = mx_reference(x, fmt)
    q = mx.quantize(x, fmt)
    assert torch.equal(q.scale_bits.reshape(-1), bits)
    assert torch.equal(mx.dequantize(q, torch.float32), ref), (mx.dequantize(q, torch.float32) - ref).abs().max()


def test_mx_non_finite_block_is_nan_and_others_untouched():
    x = torch.ones(2, 32)
    x[0, 5] = math.inf
    out = mx.fake_quantize(x, "mxfp4")
    assert out[0].isnan().all() and torch.equal(out[1], torch.ones(32))


def test_mx_packed_bytes_are_4_25_and_8_25_bits_per_element():
    assert mx.packed_bytes(4096, "mxfp4") * 8 / 4096 == 4.25
    assert mx.packed_bytes(4096, "mxfp8") * 8 / 4096 == 8.25


# -- NVFP4, re-derived ------------------------------------------------------------------------------

def nvfp4_reference(x: torch.Tensor) -> torch.Tensor:
    """One float32 tensor scale s_t = amax / (448 * 6) (1 if 0); per block of 16 the E4M3 scale
    s_b = block_amax / 6 / s_t in [2**-6, 448], rounded nearest-even on E4M3's grid; elements
    ``x * ((1 / s_t) / s_b)`` (float32, in that order) nearest-even on E2M1, times s_t * s_b."""
    e4m3 = positive_grid("fp8_e4m3").float()
    s_t = x.abs().max().float() / (448 * 6)
    s_t = torch.where(s_t == 0, torch.ones_like(s_t), s_t)
    xb = x.float().reshape(-1, 16)
    s_b = nearest_even((xb.abs().amax(1, keepdim=True) / 6 / s_t).clamp(2**-6, 448), e4m3)
    y = xb * ((1.0 / s_t) / s_b)
    return (nearest_even(y, E2M1_GRID) * (s_t * s_b)).reshape(x.shape)


@pytest.mark.parametrize("case", list(mx_cases()))
def test_nvfp4_matches_the_rederivation(case):
    x = mx_cases()[case]
    assert torch.equal(nvfp4.fake_quantize(x), nvfp4_reference(x))


def test_nvfp4_tensor_scale_per_kept_dimension():
    """K/V keep batch and token: each (b, t) slice is quantized as a tensor of its own."""
    torch.manual_seed(2)
    kv = torch.randn(2, 3, 5, 32) * torch.logspace(-2, 2, 5).reshape(1, 1, 5, 1)
    out = nvfp4.fake_quantize(kv, keep_dims=(0, 2))
    for b in range(2):
        for t in range(5):
            assert torch.equal(out[b, :, t], nvfp4_reference(kv[b, :, t]))


def test_nvfp4_packed_bytes_are_4_5_bits_per_element_plus_the_tensor_scale():
    assert nvfp4.packed_bytes(4096, 1) == 4096 // 2 + 4096 // 16 + 4


def test_nvfp4_kv_packed_width_counts_the_per_token_float32():
    # 4 bits + an E4M3 scale per 16 (4.5), plus one float32 per token across every KV head: the
    # toy model's 2 x 32 gives 5.0 bits per element, Llama-3-8B's 8 x 128 gives 4.53125
    from qeval.quant.formats import FORMATS
    from qeval.quant.granularity import Granularity
    fmt = FORMATS["nvfp4"]
    for heads, dim, want in ((2, 32, 5.0), (8, 128, 4.53125)):
        shape = torch.Size((1, heads, 10, dim))
        bits = 8 * fmt.packed_bytes(shape, "kv", 4, Granularity(), False) / shape.numel()
        assert bits == want, (heads, dim, bits)
    assert fmt.bits_per_element(4) == 4.5
