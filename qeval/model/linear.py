"""W and WA targets: every ``nn.Linear`` except the LM head becomes a quantized Linear.

Two implementations, chosen by the top-level ``backend`` knob:

- ``torch``: :class:`QuantLinear` holds the fake-quantized float weight and fake-quantizes each
  input (the accuracy reference; it saves no memory); with an FP8 ``w_format``,
  :class:`FP8WeightLinear` holds the float8 codes and their scales and dequantizes them in each
  forward (the same weight, bit for bit, in a quarter or half of the bytes).
- ``triton``: :class:`PackedQuantLinear` holds the weight packed (:mod:`qeval.quant.packed`) and runs
  the Triton kernels: the dequant-fused weight-only GEMM for W, the int8 GEMMs for WA. On a machine
  without CUDA the kernels run in Triton's interpreter (slow, for tests).
- ``auto``: ``triton`` on CUDA where the method's layout is one the kernels hold, else ``torch``.

The kernels are imported inside the functions that use them: triton is an optional, Linux-only
dependency, and ``backend=torch`` never needs it.

The packed path only takes layouts it reproduces exactly: the packed weight, dequantized, must
equal the method's own ``quantize_weight`` bit for bit before its scales are rounded to the storage
dtype (for an integer zero point in a float32 model: within the one rounding of ``-z * scale``, see
:mod:`qeval.quant.packed`), so a method that quantizes weights some other way is refused instead
of silently changed. A method that computed its own codes (GPTQ) packs them itself
(``method.pack_weight(w, layout)``), and the same check holds its result. The int8 GEMMs quantize
activations with the real-valued zero only, so WA with another ``zero_point`` stays on the torch
path.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.quantizers.base import get_keys_to_not_convert

from qeval.calibration.layers import decoder_layers
from qeval.errors import ConfigError
from qeval.model.keep import layer_of, resolved
from qeval.quant.formats import fp8
from qeval.quant.primitives import FULL_PRECISION_BITS

BACKENDS = ("auto", "torch", "triton")


class QuantLinear(nn.Module):
    """A Linear whose weight was quantized once and whose input is quantized per call (WA)."""

    def __init__(self, linear: nn.Linear, method, quantize_input: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(method.quantize_weight(linear.weight.data), requires_grad=False)
        self.bias = linear.bias
        self.method = method
        self.quantize_input = quantize_input
        self.packed_bytes = method.weight_packed_bytes(linear.weight)

    @property
    def weight_bytes_held(self) -> int:
        return self.weight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_input:
            x = self.method.quantize_activation(x)
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        b = self.method.bits
        return f"{self.in_features}, {self.out_features}, w_bits={b.w}, a_bits={b.a if self.quantize_input else 16}"


class FP8WeightLinear(nn.Module):
    """A Linear whose weight is held as float8 codes (``weight_codes``, the weight's shape) and
    float32 scales (``weight_scale``, (out or 1, n groups)), decoded to the original weight's dtype
    in every forward: equal to ``method.quantize_weight`` bit for bit."""

    def __init__(self, linear: nn.Linear, method, quantize_input: bool, stored):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, scale = stored
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale)
        self.weight_dtype = linear.weight.dtype
        self.bias = linear.bias
        self.method = method
        self.quantize_input = quantize_input
        self.packed_bytes = method.weight_packed_bytes(linear.weight)

    @property
    def weight(self) -> torch.Tensor:
        return fp8.decode(self.weight_codes, self.weight_scale, self.weight_dtype)

    @property
    def weight_bytes_held(self) -> int:
        return self.weight_codes.nbytes + self.weight_scale.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_input:
            x = self.method.quantize_activation(x)
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        f = self.method.formats
        return (f"{self.in_features}, {self.out_features}, w_format={f.w}, "
                f"a_format={f.a if self.quantize_input else None}, held={self.weight_codes.dtype}")


class UnsupportedLayout(ValueError):
    """The method's quantization is not one the packed kernels hold; the message says why."""


def packed_layout(weight, act=None) -> dict:
    """The :func:`qeval.quant.packed.pack_weight` arguments that reproduce the ``weight`` part's
    weights, with ``act`` the part quantizing their inputs (None: weight-only)."""
    from qeval.quant.packed import PACKABLE_BITS
    w = weight.rounding
    a = None if act is None else act.rounding
    wg = w.gran
    if not w.fmt.is_integer or (a is not None and not a.fmt.is_integer):
        raise UnsupportedLayout(f"w_format={w.fmt}, a_format={a.fmt if a else 'int'}: the packed kernels hold "
                                "integer codes")
    if w.bits not in PACKABLE_BITS:
        raise UnsupportedLayout(f"w_bits={w.bits}: the packed kernels hold {PACKABLE_BITS}")
    if wg.per_sequence or wg.axis not in (None, -1):
        raise UnsupportedLayout(f"weight granularity {wg}: the kernels group along the input dimension")
    if a is not None:
        ag = a.gran
        if a.bits > 8 or a.bits < 2 or ag.per_sequence or ag.axis != -1 or ag.group_size is not None:
            raise UnsupportedLayout(f"a_bits={a.bits} with activation granularity {ag}: the int8 GEMMs take "
                                    "2-8 bit activations quantized per token (a_group_size=null)")
        if a.zero_point != "real":
            # qeval.kernels.act_quant computes real-zero codes in float32; integer-zero activations
            # (computed in the model's dtype) would come out differently
            raise UnsupportedLayout(f"method.zero_point={a.zero_point} with a_bits={a.bits}: the int8 GEMMs "
                                    "quantize activations with zero_point=real only")
    return {"bits": w.bits, "group_size": wg.group_size, "symmetric": w.symmetric,
            "per_tensor": wg.axis is None, "zero_point": w.zero_point}


def reproduces(p, w: torch.Tensor, weight) -> bool:
    """Whether packed ``p`` dequantizes to the ``weight`` part's own fake-quantized ``w``: bit for
    bit, or for an integer zero point within :func:`qeval.quant.packed.integer_zero_gap` (the
    rounding of ``-z * scale``, nonzero only when the scale has more significant bits than
    float16's)."""
    from qeval.quant.packed import dequantize_packed, integer_zero_gap
    got, want = dequantize_packed(p, w.dtype), weight.quantize_weight(w)
    if weight.rounding.zero_point == "real":
        return torch.equal(got, want)
    return bool(((got.float() - want.float()).abs() <= integer_zero_gap(p)).all())


class PackedQuantLinear(nn.Module):
    """A Linear held packed and run by the Triton kernels (W: weight-only GEMM, WA: int8 GEMMs)."""

    def __init__(self, linear: nn.Linear, recipe, quantize_input: bool):
        super().__init__()
        from qeval.quant.packed import pack_weight, param_dtype_for
        from qeval.kernels.w4a8_gemm import GroupedInt8Weight
        from qeval.kernels.w8a8_gemm import Int8Weight
        w = linear.weight.data
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, act = recipe.packing_parts(quantize_input)
        layout = packed_layout(weight, act)
        # a part holding its own codes (GPTQ's) packs those; otherwise round-to-nearest of the weight
        own = getattr(weight, "pack_weight", None)
        p = own(w, layout) if own is not None else pack_weight(w, **layout)
        if not reproduces(p, w, weight):
            raise UnsupportedLayout(f"method={weight.spec.name}: its weights are not round-to-nearest min-max "
                                    "in the packed layout")
        p = p.with_param_dtype(param_dtype_for(w.dtype))
        self.bias = linear.bias
        self.w_bits = weight.rounding.bits
        # the int8 GEMMs quantize each input as the act part would (per token, real zero)
        self.a_bits, self.a_symmetric = (act.rounding.bits, act.rounding.symmetric) if act else (16, False)
        self.quantize_input = quantize_input
        self.packed_bytes = weight.weight_packed_bytes(w)
        if not quantize_input:
            self.weight_store, self.kernel = p, "wq_gemm"
        elif p.group_size == p.in_features and p.bits == 8:
            self.weight_store, self.kernel = Int8Weight.from_packed(p), "w8a8_gemm"
        else:
            self.weight_store, self.kernel = GroupedInt8Weight.from_packed(p), "w4a8_gemm"

    @property
    def weight_bytes_held(self) -> int:
        return self.weight_store.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "wq_gemm":
            from qeval.kernels.wq_gemm import wq_matmul
            return wq_matmul(x, self.weight_store, self.bias)
        a = dict(a_bits=self.a_bits, a_symmetric=self.a_symmetric)
        if self.kernel == "w8a8_gemm":
            from qeval.kernels.w8a8_gemm import w8a8_matmul
            return w8a8_matmul(x, self.weight_store, self.bias, **a)
        from qeval.kernels.w4a8_gemm import w4a8_matmul
        return w4a8_matmul(x, self.weight_store, self.bias, **a)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, w_bits={self.w_bits}, "
                f"a_bits={self.a_bits if self.quantize_input else 16}, kernel={self.kernel}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA, ``torch`` elsewhere."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend}: allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def _make_linear(module: nn.Linear, method, quantize_input: bool, backend: str, strict: bool):
    if backend == "triton" and method.bits.w < FULL_PRECISION_BITS:
        try:
            return PackedQuantLinear(module, method, quantize_input)
        except UnsupportedLayout as e:
            if strict:
                raise ConfigError(f"backend=triton: {e}") from e
    elif backend == "triton" and strict:
        raise ConfigError(f"backend=triton: w_bits={method.bits.w}: the kernels need quantized weights "
                          "(activation-only quantization runs with backend=torch)")
    if (stored := method.store_weight(module.weight.data)) is not None:
        return FP8WeightLinear(module, method, quantize_input, stored)
    return QuantLinear(module, method, quantize_input)


def fused_weights(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Weights held outside any ``nn.Linear`` as one tensor of 3 or more dimensions (transformers 5's
    fused mixture-of-experts tensors, ``experts.gate_up_proj`` (E, 2I, H)): the Linear swap does
    not reach them."""
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.dim() >= 3]


def refuse_fused_weights(model: nn.Module, method, model_name: str) -> None:
    """A W or WA run on a model with fused weights would leave them (most of a MoE's weights) in
    full precision under a row that says W4: refused, before load where the architecture allows
    (qeval.validate) and here on the loaded model."""
    b = method.bits
    if min(b.w, b.a) >= FULL_PRECISION_BITS or not (fused := fused_weights(model)):
        return
    name, shape = fused[0]
    key, value = ("w_bits", b.w) if b.w < FULL_PRECISION_BITS else ("a_bits", b.a)
    kind = model.config.get_text_config().model_type
    raise ConfigError(f"{key}={value}: model {model_name} ({kind}) holds weights outside nn.Linear ({name}, a "
                      f"{'x'.join(map(str, shape))} fused expert tensor, and {len(fused) - 1} more) that the Linear "
                      f"swap would leave in full precision; allowed: w_bits=16 and a_bits=16 (KV methods run on it)")


def quantize_linears(model: nn.Module, method, backend: str = "auto", keep=()) -> dict:
    """Swap Linears in place (W when w_bits < 16, WA when a_bits < 16); returns byte counts.

    ``weight_bytes_held`` is measured from the tensors the swapped layers hold (packed words plus
    scales and zeros on the triton path, float8 codes plus scales for an FP8 ``w_format``, the
    float weight otherwise); ``weight_bytes_packed`` is the formula of
    :func:`qeval.quant.packed_bytes` (or the format's), and ``weight_bits_per_element`` that
    formula per weight element (4.25 for int4 in groups of 128 or mxfp4, 4.5 for nvfp4).
    """
    if method.bits.w >= 16 and method.bits.a >= 16:
        return {}
    device = next(model.parameters()).device
    chosen = resolve_backend(backend, device)
    skip = set(get_keys_to_not_convert(model))
    # w_keep_layers: those decoder layers' Linears stay as they are, counted at their own bytes
    # (16 bits per element in the packed formula) so the row's bits per element is the model's
    prefix, layers = decoder_layers(model) if keep else ("", [])
    kept_layers = resolved(keep, len(layers))
    swapped, kept, held, packed, numel, kernels = 0, 0, 0, 0, 0, set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.split(".")[-1] in skip or name in skip:
            continue
        if kept_layers and layer_of(name, prefix) in kept_layers:
            kept += 1
            held += module.weight.numel() * module.weight.element_size()
            packed += module.weight.numel() * 2
            numel += module.weight.numel()
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = _make_linear(module, method, method.bits.a < 16, chosen, strict=backend == "triton")
        setattr(parent, child, q)
        swapped += 1
        held += q.weight_bytes_held
        packed += q.packed_bytes
        numel += module.weight.numel()
        kernels.add(getattr(q, "kernel", "torch"))
    if swapped == 0:
        raise ValueError("no nn.Linear layers found to quantize in this model")
    return {"linears_quantized": swapped, "linears_kept": kept, "weight_bytes_held": held, "weight_bytes_packed": packed,
            "weight_bits_per_element": 8 * packed / numel, "linear_backend": ",".join(sorted(kernels))}
