"""Zero-point conventions against the reference formulas, written out here literally and on their
own (no qeval code): Qllm-Eval's ``pseudo_quantize_tensor`` (``integer``, also llm-awq's) and GPTQ's
``Quantizer`` (``gptq``). qeval must equal them bit for bit; the conventions must differ where the
study says they do (outliers, one-signed groups); and the methods, the packed weights and the rows
must carry the convention a run chose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from method_configs import make_contract_method, make_method

from qeval.errors import ConfigError
from qeval.quant.packed import dequantize_packed, integer_zero_gap, pack_weight
from qeval.quant.primitives import (
    dequantize,
    fake_quantize,
    quantize,
    real_offset,
    relative_error,
)
from qeval.validate import CONFIG_DIR


# -- the references, verbatim in substance ---------------------------------------------------------
def qllm_eval_quantize(w, n_bit, q_group_size=-1, zero_point=True):
    """thu-nics/qllm-eval ``qllm_eval/quantization/quant_funcs.py::pseudo_quantize_tensor`` (the
    same as mit-han-lab/llm-awq's), in ``w``'s own dtype; returns (w_hat, scales, zeros)."""
    shape = w.shape
    if q_group_size > 0:
        w = w.reshape(-1, q_group_size)
    if zero_point:
        max_val = w.amax(dim=1, keepdim=True)
        min_val = w.amin(dim=1, keepdim=True)
        max_int = 2**n_bit - 1
        min_int = 0
        scales = (max_val - min_val).clamp(min=1e-5) / max_int
        zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
    else:
        max_val = w.abs().amax(dim=1, keepdim=True)
        max_val = max_val.clamp(min=1e-5)
        max_int = 2 ** (n_bit - 1) - 1
        min_int = -(2 ** (n_bit - 1))
        scales = max_val / max_int
        zeros = 0
    w = (torch.clamp(torch.round(w / scales) + zeros, min_int, max_int) - zeros) * scales
    return w.reshape(shape), scales, zeros


def gptq_quantize(x, bits, group_size=None):
    """IST-DASLab/gptq ``quant.py``: ``Quantizer.find_params`` (asymmetric, per row) then
    ``quantize``, in float32 (``gptq.py`` casts the weight with ``W.float()``), cast back at the end."""
    shape, dtype = x.shape, x.dtype
    x = x.float().reshape(-1, group_size or shape[-1])
    maxq = torch.tensor(2**bits - 1)
    tmp = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return (scale * (q - zero)).reshape(shape).to(dtype)


# -- data: every row of 256 is one per-channel group, or two groups of 128 --------------------------
def groups(kind: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 256, generator=g)
    if kind == "outliers":      # a few channels ~50x the rest, as in LLM activations and weights
        x[:, [3, 130, 200]] *= 50.0
    elif kind == "positive":    # one-signed: the integer zero point cannot move below the minimum
        x = 1.0 + x.abs()
    elif kind == "negative":
        x = -1.0 - x.abs()
    elif kind == "constant":    # max == min: the reference's 1e-5 range floor decides
        x = torch.full((16, 256), 0.7)
        x[8:] = -2.5
        x[12:] = 0.0
    return x.to(dtype)


KINDS = ["outliers", "positive", "negative", "constant", "normal"]
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("group", [None, 128], ids=["per_channel", "g128"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_integer_is_qllm_evals_formula_bit_for_bit(kind, bits, dtype, group, symmetric):
    x = groups(kind, dtype)
    ref, scales, zeros = qllm_eval_quantize(x.clone(), bits, group or -1, zero_point=not symmetric)
    q = quantize(x, bits, -1, group, symmetric, zero_point="integer")
    assert q.zero_point == "integer" and q.scale.dtype == dtype
    out = dequantize(q, x, -1)
    assert out.dtype == dtype and torch.equal(out, ref), (out - ref).abs().max()
    assert torch.equal(fake_quantize(x, bits, -1, group, symmetric, zero_point="integer"), ref)
    # QParams carries the reference's own scale and integer zero point (per group, in order)
    assert torch.equal(q.scale.reshape(-1), scales.reshape(-1))
    assert torch.equal(q.zero.reshape(-1), torch.zeros_like(scales).add(zeros).reshape(-1))


def test_integer_is_computed_in_the_inputs_dtype_because_upcasting_changes_fp16():
    # the reference runs in float16 in the study; the same formula in float32 picks other scales
    # and codes, so computing the integer convention in float32 could not be bit-exact
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(1)).half()
    ref, _, _ = qllm_eval_quantize(x, 4)
    upcast, _, _ = qllm_eval_quantize(x.float(), 4)
    assert (upcast.half() != ref).any()
    assert torch.equal(fake_quantize(x, 4, -1, None, zero_point="integer"), ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("group", [None, 128], ids=["per_channel", "g128"])
def test_gptq_is_gptqs_formula_bit_for_bit_and_clips_nothing(kind, bits, dtype, group):
    x = groups(kind, dtype)
    out = fake_quantize(x, bits, -1, group, zero_point="gptq")
    assert torch.equal(out, gptq_quantize(x, bits, group))
    # the range holds every element (and 0), so each is within half a step of its reconstruction;
    # eps * |x| covers float32 rounding of x / scale and the final cast to x's dtype
    q = quantize(x, bits, -1, group, zero_point="gptq")
    step = q.scale.expand(q.codes.shape).reshape(x.shape)
    err = (out.float() - x.float()).abs()
    eps = torch.finfo(dtype).eps
    assert (err <= step / 2 * (1 + eps) + eps * x.float().abs()).all(), (err - step / 2).max()


@pytest.mark.parametrize("kind", ["positive", "negative"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_integer_clips_one_signed_groups_where_gptq_and_real_do_not(kind, bits):
    """An all-positive group gets zero point 0 (an all-negative one qmax), so its grid spans
    ``[0, hi - lo]`` (``[lo - hi, 0]``): elements beyond it saturate at the grid's end. The test
    fails if the reference's clamp were dropped."""
    x = groups(kind, torch.float32)
    xg = x.reshape(16, 2, 128)
    qmax = 2**bits - 1
    q = quantize(x, bits, -1, 128, zero_point="integer")
    assert torch.equal(q.zero, torch.full_like(q.zero, 0.0 if kind == "positive" else qmax))
    out = dequantize(q, x, -1).reshape(xg.shape)
    # (16, 2, 1): the end of each group's representable range
    end = ((qmax if kind == "positive" else 0) - q.zero) * q.scale
    beyond = xg > end if kind == "positive" else xg < end
    # here about 8 % of the elements: those more than (hi - lo) above 0
    assert beyond.float().mean() > 0.05, beyond.float().mean()
    assert torch.equal(out[beyond], end.expand_as(xg)[beyond]), "clipped elements sit at the grid's end"
    assert ((out - xg).abs() > q.scale / 2 * (1 + 1e-3)).any(), "clipped: more than half a step off"
    for zp in ("gptq", "real"):
        qo = quantize(x, bits, -1, 128, zero_point=zp)
        err = (dequantize(qo, x, -1).reshape(xg.shape) - xg).abs()
        # nothing clipped: within half a step, plus float32 rounding of x / scale
        assert (err <= qo.scale / 2 + 1e-6 * xg.abs()).all(), zp


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_integer_zero_beats_real_zero_on_outlier_groups(bits):
    """Where a few outliers set the range, the integer grid holds 0 exactly and the many small
    values round to it; the real grid starts at the minimum and generally misses 0 by up to half a
    step, which is then the error of every small value."""
    x = groups("outliers", torch.float32)
    real = relative_error(x, fake_quantize(x, bits, -1, 128, zero_point="real"))
    integer = relative_error(x, fake_quantize(x, bits, -1, 128, zero_point="integer"))
    assert integer < 0.8 * real, (integer, real)


@pytest.mark.parametrize("zero_point", ["real", "integer", "gptq"])
def test_real_offset_turns_any_zero_into_the_packed_form(zero_point):
    x = groups("normal", torch.float32)
    q = quantize(x, 4, -1, 128, zero_point=zero_point)
    packed_form = q.codes.float() * q.scale.float() + real_offset(q)
    assert torch.allclose(packed_form, dequantize(q, x, -1).reshape(q.codes.shape), rtol=0, atol=1e-6)


@pytest.mark.parametrize("zero_point", ["integer", "gptq"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits,group", [(4, 32), (3, 64), (8, None)])
def test_packed_weights_hold_an_integer_zero(zero_point, symmetric, bits, group):
    """fp16 weights: ``code * scale - z * scale`` is exact in float32, so the packed weight equals
    fake quantization bit for bit. fp32 weights: ``z * scale`` rounds once, bounded by
    ``integer_zero_gap``."""
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    w[:, 5] += 0.3      # one-signed groups too
    for dtype in (torch.float16, torch.float32):
        wd = w.to(dtype)
        p = pack_weight(wd, bits, group, symmetric, zero_point=zero_point)
        fq = fake_quantize(wd, bits, -1, group, symmetric, zero_point=zero_point)
        q = quantize(wd, bits, -1, group or 128, symmetric, zero_point=zero_point)
        assert torch.equal(p.codes() - p.offset, q.codes.reshape(w.shape).int())
        got = dequantize_packed(p, dtype)
        if dtype == torch.float16:
            assert torch.equal(got, fq)
        else:
            assert ((got - fq).abs() <= integer_zero_gap(p)).all()


@pytest.mark.parametrize("name", ["uniform", "group"])
@pytest.mark.parametrize("zero_point", ["real", "integer", "gptq"])
def test_methods_use_their_convention_on_every_target(name, zero_point):
    m = make_method(name, kv_bits=3, w_bits=3, a_bits=3, w_group_size=128, zero_point=zero_point)
    assert m.describe()["zero_point"] == m.describe()["method.zero_point"] == zero_point
    x = groups("outliers", torch.float32)
    k, v = x.reshape(2, 2, 4, 256), -x.reshape(2, 2, 4, 256)
    assert torch.equal(m.quantize_weight(x), m.weight.rounding.gran.apply(x, 3, False, zero_point=zero_point))
    assert torch.equal(m.quantize_activation(x), fake_quantize(x, 3, -1, None, zero_point=zero_point))
    kq, vq = m.quantize_kv(k, v)
    assert torch.equal(kq, fake_quantize(k, 3, -1, None, zero_point=zero_point))
    assert torch.equal(vq, fake_quantize(v, 3, -1, None, zero_point=zero_point))
    if zero_point != "real":
        assert not torch.equal(m.quantize_activation(x), fake_quantize(x, 3, -1, None))


def test_kv_methods_keep_the_real_zero_of_their_papers():
    for name in ("kivi", "gear"):
        assert make_contract_method(name).describe()["zero_point"] == "real"


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("name", ["uniform", "group"])
def test_the_default_is_qllm_evals_and_a_bad_value_is_a_one_line_error(name):
    from qeval.run import validate
    assert _compose(f"method={name}").method.zero_point == "integer"
    with pytest.raises(ConfigError) as e:
        validate(_compose(f"method={name}", "model=tiny-random", "w_bits=4", "method.zero_point=symmetric"))
    msg = str(e.value)
    assert msg == "method.zero_point=symmetric: allowed: real, integer, gptq", msg


@pytest.mark.timeout(300)
def test_rows_record_the_zero_point(tmp_path):
    from qeval.run import run
    cell = ["model=tiny-random", "method=group", "w_bits=4", "task=passkey", "device=cpu",
            "task.passkey.lengths=[240]", "task.passkey.depths=[0.5]", "task.passkey.samples_per_cell=1",
            "task.passkey.key_digits=3", "task.passkey.batch_size=1", f"results_dir={tmp_path}"]
    seen = {}
    for zp in ("integer", "gptq"):
        result = run(_compose(*cell, f"method.zero_point={zp}"))
        assert result["status"] == "ok", result
        rows = [json.loads(line) for line in (Path(result["run_dir"]) / "rows.jsonl").read_text().splitlines()]
        assert rows and all(r["zero_point"] == r["method.zero_point"] == zp for r in rows)
        seen[zp] = result["run_dir"]
    assert seen["integer"] != seen["gptq"], "the convention is part of a run's identity"
