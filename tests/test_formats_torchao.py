"""MXFP4 / MXFP8 / NVFP4 against torchao's reference implementations (``torchao.prototype.mx_formats``:
``to_mx`` with the spec's FLOOR scale, ``nvfp4_quantize`` with a per-tensor scale), on CPU.

torchao is not a qeval dependency: these tests run where it is installed (``pip install torchao``)
and are skipped otherwise; tests/test_formats.py re-derives the same formats from the specs either
way. Codes and scales must be equal, not close: both sides claim the same rounding.
"""

from __future__ import annotations

import pytest
import torch
from test_formats import mx_cases

from qeval.quant.formats import e2m1, mx, nvfp4

mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")

ELEMENTS = {"mxfp4": torch.float4_e2m1fn_x2, "mxfp8": torch.float8_e4m3fn}


def torchao_fp4_values(packed: torch.Tensor, shape) -> torch.Tensor:
    return kernels.f4_unpacked_to_f32(kernels.unpack_uint4(packed.view(torch.uint8))).reshape(shape)


def cases():
    out = dict(mx_cases())
    torch.manual_seed(3)
    out["wide_range"] = torch.randn(8, 256) * torch.logspace(-6, 6, 256)
    out["bf16"] = torch.randn(4, 128).to(torch.bfloat16)
    return out


@pytest.mark.parametrize("fmt", list(ELEMENTS))
@pytest.mark.parametrize("case", list(cases()))
def test_mx_equals_torchao_to_mx(fmt, case):
    x = cases()[case]
    scale, data = mx_tensor.to_mx(x.contiguous(), ELEMENTS[fmt], 32)
    q = mx.quantize(x, fmt)
    assert torch.equal(scale.view(torch.uint8), q.scale_bits.squeeze(-1))
    ref = torchao_fp4_values(data, x.shape) if fmt == "mxfp4" else data.float()
    # where the scale is E8M0's smallest, 2**-127, torchao divides by 2**-126 instead (its
    # mx_tensor.py: a float32-subnormal workaround for Triton), so only those blocks' elements
    # differ; tests/test_formats.py holds them to the spec
    spec_only = (q.scale_bits == 0).expand_as(q.codes).flatten(-2)
    got = mx.element_values(q).flatten(-2)
    assert torch.equal(got[~spec_only], ref[~spec_only])


@pytest.mark.parametrize("case", list(cases()))
def test_nvfp4_equals_torchao_nvfp4_quantize(case):
    x = cases()[case]
    s_t = nvfp4_tensor.per_tensor_amax_to_scale(x.abs().amax())
    if s_t == 0:
        pytest.skip("torchao divides by a zero tensor scale; qeval uses 1 (tests/test_formats.py)")
    block_scale, data = nvfp4_tensor.nvfp4_quantize(x.contiguous(), 16, s_t)
    q = nvfp4.quantize(x)
    assert torch.equal(block_scale.view(torch.uint8).reshape(-1), q.block_scale.view(torch.uint8).reshape(-1))
    assert torch.equal(torchao_fp4_values(data, x.shape), e2m1.from_codes(q.codes).flatten(-2))
    assert torch.equal(q.tensor_scale.reshape(()), s_t)
