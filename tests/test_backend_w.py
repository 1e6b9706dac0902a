"""End to end on the tiny model: ``backend=triton`` (packed weights, Triton kernels) against
``backend=torch`` (fake quantization) for W and WA: same greedy generations, near-identical logits,
real bytes held, and one-line errors for layouts the kernels do not hold."""


import copy
from pathlib import Path

import pytest
import torch
from method_configs import from_knobs, method_params
from omegaconf import OmegaConf

from qeval.errors import ConfigError
from qeval.methods.base import Bits, Knobs
from qeval.model import loading
from qeval.model.handle import Handle
from qeval.model.linear import PackedQuantLinear, QuantLinear, quantize_linears
from qeval.quant.primitives import relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODEL_CFG = OmegaConf.load(Path(__file__).parents[1] / "qeval/configs/model/tiny-random.yaml")
PROMPTS = ["The pass key is 4217. Remember it.", "Go on:"]


def group(w, a=16, g=32, symmetric=False, zero_point="integer"):
    params = method_params("group", symmetric=symmetric, zero_point=zero_point)
    return from_knobs("group", params, Knobs(Bits(w, a), w_group_size=g))


def uniform(w, a=16, **over):
    return from_knobs("uniform", method_params("uniform", **over), Knobs(Bits(w, a)))


@pytest.fixture(scope="module")
def tiny():
    # hidden 128, intermediate 256: w_group_size 32 / 64 divide both
    return loading.load(MODEL_CFG, DEVICE, "float32", "sdpa", seed=0)


def _logits(model, tok):
    enc = tok(PROMPTS, return_tensors="pt", padding=True).to(DEVICE)
    with torch.no_grad():
        return model(**enc).logits[enc["attention_mask"].bool()]


CASES = {  # name -> (method, kernel the packed path must pick); W: integer zeros held as -z * scale
    "W4 g32": (lambda: group(4), "wq_gemm"),
    "W3 g64 gptq": (lambda: group(3, g=64, zero_point="gptq"), "wq_gemm"),
    "W8A8 per-channel": (lambda: uniform(8, 8, zero_point="real"), "w8a8_gemm"),
    "W4A8 g64": (lambda: group(4, 8, g=64, zero_point="real"), "w4a8_gemm"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_and_torch_backends_agree(tiny, case):
    model, tok = tiny
    make, kernel = CASES[case]
    method = make()
    runs = {}
    for backend in ("torch", "triton"):
        q = copy.deepcopy(model)
        facts = quantize_linears(q, method, backend=backend)
        runs[backend] = (q, facts)
    (ref_model, ref_facts), (tri_model, tri_facts) = runs["torch"], runs["triton"]
    assert tri_facts["linear_backend"] == kernel and ref_facts["linear_backend"] == "torch"
    layers = [m for m in tri_model.modules() if isinstance(m, PackedQuantLinear)]
    assert len(layers) == tri_facts["linears_quantized"] == ref_facts["linears_quantized"] > 0
    assert not any(isinstance(m, QuantLinear) for m in tri_model.modules())
    # bytes held are measured from the packed tensors, and a float32 weight costs 4 bytes
    assert tri_facts["weight_bytes_held"] == sum(m.weight_store.nbytes for m in layers)
    assert tri_facts["weight_bytes_held"] < ref_facts["weight_bytes_held"] / 3
    assert tri_facts["weight_bytes_packed"] == ref_facts["weight_bytes_packed"]
    # quantization changed the model, and both backends changed it the same way
    full, ref, tri = _logits(model, tok), _logits(ref_model, tok), _logits(tri_model, tok)
    # W: the same float weight, only summation order differs. WA: a last-ulp difference can move a
    # later layer's activation across a rounding boundary (one step of one code), so the bound is a
    # small fraction of what quantization itself did to the logits.
    effect, gap = relative_error(full, ref), relative_error(ref, tri)
    assert effect > 1e-3
    assert gap < (1e-5 if kernel == "wq_gemm" else 0.2 * effect), (gap, effect)
    # two new tokens: the second is a one-row step, so the decode GEMV path runs too
    gen = {b: Handle(m, tok, method, "cache").generate(PROMPTS, max_new_tokens=2)
           for b, (m, _) in runs.items()}
    assert gen["triton"] == gen["torch"]


def test_auto_picks_triton_only_on_cuda(tiny):
    model, _ = tiny
    facts = quantize_linears(copy.deepcopy(model), group(4), backend="auto")
    assert facts["linear_backend"] == ("wq_gemm" if DEVICE == "cuda" else "torch")


@pytest.mark.parametrize("make,match", [
    (lambda: uniform(4, 8, a_granularity="per_tensor"), "per token"),
    (lambda: uniform(1), "w_bits=1"),
    (lambda: group(16, 8), "need quantized weights"),
    (lambda: group(4, 8, g=64), "zero_point=integer"),   # the int8 GEMMs quantize activations with a real zero
])
def test_triton_refuses_layouts_the_kernels_do_not_hold(tiny, make, match):
    model, _ = tiny
    with pytest.raises(ConfigError, match=match):
        quantize_linears(copy.deepcopy(model), make(), backend="triton")
    # auto falls back to the reference instead
    facts = quantize_linears(copy.deepcopy(model), make(), backend="auto")
    assert facts["linear_backend"] == "torch"
