"""Static FP8 K/V scales (``kv_scale=static``): scales fixed from calibration data before the run
evaluates anything, as vLLM's per-layer ``k_scale`` / ``v_scale`` (``vllm/model_executor/layers/
attention/attention.py``; a checkpoint's ``kv_cache_scheme``, ``strategy: attn_head`` for one per
KV head), instead of the dynamic scale taken from each K/V as it comes.

What is measured: the K/V each layer hands its cache (post-RoPE, the KV heads only under GQA:
exactly what a cache stores) for every calibration sample, run alone through the full-precision
model right after it loads, before any weight is quantized or any calibrated method changes it.
Per layer and KV head the largest magnitude (amax) is kept and saved through the calibration store
(``k_amax`` / ``v_amax``, float32 (n_layers, kv_heads)), so both FP8 formats and both granularities
reuse one calibration.

| ``kv_scale``      | scale per layer                        | shape held     | row ``kv_scale_granularity`` |
| ----------------- | -------------------------------------- | -------------- | ---------------------------- |
| ``dynamic``       | the method's groups, from each K/V      | per group      | ``per_token fp32``, ...      |
| ``static``        | ``amax / max`` over all KV heads        | (1, 1, 1, 1)   | ``static per_tensor fp32``   |
| ``static_per_head`` | ``amax / max`` per KV head            | (1, H, 1, 1)   | ``static per_head fp32``     |

``max`` is the format's largest finite value (448 for E4M3, 57344 for E5M2), so the calibration's
largest K (or V) lands exactly on it; a later value beyond that amax saturates to ``±max * scale``
(:func:`qeval.quant.formats.fp8.encode`: clamp, then round to nearest even). vLLM's own
``calculate_kv_scales`` is a different thing: the first batch's amax over ``K_SCALE_CONSTANT``
(a headroom constant), not a calibration set.

Data: the ``calibration`` group (:mod:`.data`). ``calibration=auto`` resolves to the method's own
preset where its YAML names one, the toy corpus on the toy model, and otherwise to
:data:`DEFAULT_PRESET` (SmoothQuant's pile-val documents: its activation scales are the same
statistic, a maximum magnitude over calibration text).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from omegaconf import open_dict
from transformers.cache_utils import Cache, DynamicLayer

from qeval.calibration import data, store
from qeval.errors import ConfigError
from qeval.kv.attention import register_attention
from qeval.kv.cache import cache_kwarg
from qeval.model import loading
from qeval.quant.formats import INT, STORED, fp8, lookup

DYNAMIC = "dynamic"
MODES = (DYNAMIC, "static", "static_per_head")
GRANULARITY = {"static": "per_tensor", "static_per_head": "per_head"}
DEFAULT_PRESET = "smoothquant_pile"


def mode(cfg) -> str:
    return cfg.get("kv_scale", DYNAMIC)


def is_static(cfg) -> bool:
    return mode(cfg) != DYNAMIC


def data_config(cfg):
    """``cfg`` as K/V scales calibrate from it: the preset ``auto`` resolves to (module docstring),
    and no published weight-method file (``method.scales_file`` holds no K/V amax)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg.method):
        cfg.method.calibration = cfg.method.get("calibration") or DEFAULT_PRESET
        cfg.method.scales_file = None
    return cfg


def check(cfg, arch) -> None:
    """``kv_scale`` is known, meets an FP8 ``kv_format`` and no K/V grouping of its own; the data
    is valid and readable unless a saved result makes it moot (before any weights load)."""
    kind, fmt = mode(cfg), lookup(cfg.get("kv_format") or INT)
    if kind not in MODES:
        raise ConfigError(f"kv_scale={kind}: allowed: {', '.join(MODES)}")
    if kind == DYNAMIC:
        return
    if not fmt.stored:
        raise ConfigError(f"kv_scale={kind}: kv_format={fmt} has no fixed scale to calibrate (int keeps a "
                          f"min-max scale per group, mx/nvfp4 their block scales); allowed: kv_format="
                          f"{' or kv_format='.join(f.name for f in STORED)}, or kv_scale=dynamic")
    if cfg.get("kv_group_size") is not None:
        raise ConfigError(f"kv_group_size={cfg.kv_group_size}: kv_scale={kind} holds one scale per layer "
                          f"({GRANULARITY[kind]}), not per group; allowed: null")
    cfg = data_config(cfg)
    spec = data.resolve(cfg)
    data.check(spec, getattr(arch.get_text_config(), "max_position_embeddings", None))
    if not store.saved(store.directory(cfg, store.identity(cfg, Calibration, spec, _dtype(cfg)))):
        data.check_available(spec)


def _dtype(cfg) -> str:
    return str(loading.resolve_dtype(cfg.dtype, loading.resolve_device(cfg.device))).removeprefix("torch.")


# ---------------------------------------------------------------------------- measuring
class _AmaxLayer(DynamicLayer):
    """A cache layer that records the amax per KV head of every K/V it is handed."""

    def __init__(self, amax: list, i: int):
        super().__init__()
        self.amax, self.i = amax, i

    def update(self, key_states, value_states, *args, **kwargs):
        for j, x in enumerate((key_states, value_states)):
            # (B, H, T, D) -> (H,)
            m = x.detach().abs().float().amax(dim=(0, 2, 3)).cpu()
            old = self.amax[j][self.i]
            self.amax[j][self.i] = m if old is None else torch.maximum(old, m)
        return super().update(key_states, value_states, *args, **kwargs)


@torch.no_grad()
def kv_amax(model, samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (n_layers, kv_heads) amax of K and of V over ``samples`` ((1, T) ids, each alone)."""
    n = model.config.get_text_config().num_hidden_layers
    amax = [[None] * n, [None] * n]
    device = model.get_input_embeddings().weight.device
    for ids in samples:
        cache = Cache(layers=[_AmaxLayer(amax, i) for i in range(n)])
        model(input_ids=ids.to(device), **{cache_kwarg(model): cache}, use_cache=True)
    return torch.stack(amax[0]), torch.stack(amax[1])


# ---------------------------------------------------------------------------- holding and applying
@dataclass(frozen=True)
class KVScales:
    """float32 scales per layer, ``k`` and ``v`` (n_layers, 1) per tensor or (n_layers, H) per head."""

    k: torch.Tensor
    v: torch.Tensor
    fmt: str

    @classmethod
    def from_amax(cls, k_amax: torch.Tensor, v_amax: torch.Tensor, fmt: str, kind: str) -> KVScales:
        if GRANULARITY[kind] == "per_tensor":
            k_amax, v_amax = k_amax.amax(-1, keepdim=True), v_amax.amax(-1, keepdim=True)
        return cls(fp8.scale_from_amax(k_amax, fmt), fp8.scale_from_amax(v_amax, fmt), fmt)

    def layer(self, layer_idx: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer_idx``'s (k, v) scales shaped (1, H or 1, 1, 1), to broadcast on (B, H, T, D)."""
        if layer_idx is None:
            raise ValueError("static K/V scales are per layer: the caller must name the layer")
        return self.k[layer_idx].view(1, -1, 1, 1), self.v[layer_idx].view(1, -1, 1, 1)

    def fake_quantize(self, layer_idx: int | None, k: torch.Tensor, v: torch.Tensor):
        """(B, H, T, D) K/V -> the same, each element through FP8 with its layer's fixed scale."""
        ks, vs = (s.to(k.device) for s in self.layer(layer_idx))
        return (fp8.decode(fp8.encode(k, ks, self.fmt), ks, k.dtype),
                fp8.decode(fp8.encode(v, vs, self.fmt), vs, v.dtype))


class Calibration:
    """``kv_scale=static``'s step for :class:`qeval.calibration.stage.Stage`: measures (or reads
    back) the amax and hands the method its :class:`KVScales`."""

    @classmethod
    def calibration_identity(cls, cfg) -> dict:
        """What the amax depends on besides the model and the data: nothing of the method, the
        format or the granularity (they are applied after), only what is measured."""
        return {"kv_amax": "post-RoPE K/V per layer and KV head, full-precision model"}

    def __init__(self, method, kind: str):
        self.method, self.kind = method, kind

    def _apply(self, k_amax, v_amax) -> None:
        self.method.kv_scales = KVScales.from_amax(k_amax, v_amax, self.method.knobs.formats.kv.name, self.kind)

    def calibrate(self, model, samples: list[torch.Tensor]) -> dict:
        k_amax, v_amax = kv_amax(model, samples)
        self._apply(k_amax, v_amax)
        return {"k_amax": k_amax, "v_amax": v_amax}

    def apply_calibration(self, model, result: dict) -> None:
        self._apply(result["k_amax"], result["v_amax"])


def row(facts: dict) -> dict:
    """The stage's row columns, prefixed ``kv_`` (``kv_calibration.dataset``, ``kv_calibration_reused``)
    so that a calibrated weight method's own ``calibration.*`` columns stand beside them."""
    return {f"kv_{k}": v for k, v in facts.items()}


def install_simulated(model, method, base: str) -> str:
    """``simulated`` semantics with static scales: an attention function that quantizes each
    layer's K/V with that layer's scales (``module.layer_idx``), then attends with ``base``. As
    :func:`qeval.kv.simulated.install`, it proves the function is really called."""
    calls = [0]

    def make(attend):
        def attention(module, query, key, value, attention_mask, **kwargs):
            calls[0] += 1
            key, value = method.quantize_kv(key, value, None, layer_idx=module.layer_idx)
            return attend(module, query, key, value, attention_mask, **kwargs)
        return attention

    name = register_attention("static_kv", base, make)
    model.set_attn_implementation(name)
    with torch.no_grad():
        model(input_ids=torch.ones(1, 2, dtype=torch.long, device=model.device))
    if not calls[0]:
        raise ConfigError(f"kv_semantics=simulated: {type(model).__name__} does not route attention through "
                          f"transformers' AttentionInterface, so K/V would not be quantized; use kv_semantics=cache")
    return name
