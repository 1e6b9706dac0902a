"""Bad input gets one line naming the key, the value and what is allowed, before any model loads.

Two passes: :mod:`qeval.overrides` reads the command line against the config tree (unknown
groups, options and keys, with a did-you-mean) before Hydra composes anything and before torch is
imported; ``check_config`` here reads the composed config against the method and the model's
architecture config (bits, group sizes, targets, semantics, availability offline).
"""

from __future__ import annotations

import json
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import OmegaConf

from qeval import CONFIG_DIR  # noqa: F401  (re-exported: tests and scripts read it from here)
from qeval.calibration import kv_scales
from qeval.calibration import stage as calibration
from qeval.errors import ConfigError
from qeval.kv.attention import routes_registered_attention, sliding_window
from qeval.methods import METHODS
from qeval.methods.base import Bits
from qeval.methods.build import build_parts, fused_decode_problem
from qeval.model import loading
from qeval.overrides import (
    _did_you_mean,
    check_composes,  # noqa: F401  (re-exported)
    check_overrides,  # noqa: F401  (re-exported)
    check_results_dir,
    option_node,
    options,
)
from qeval.quant import formats as F
from qeval.quant.primitives import FULL_PRECISION_BITS
from qeval.recipe.build import build_recipe, part_views
from qeval.recipe.check import check as check_recipe
from qeval.recipe.slot_names import KV as KV_SLOT
from qeval.schema import check as check_schema
from qeval.tasks import CHECKS, TASKS


def _bits(cfg) -> dict[str, int]:
    b = Bits.from_config(cfg)
    return {"w_bits": b.w, "a_bits": b.a, "k_bits": b.k, "v_bits": b.v}


FORMAT_KEYS = {"w_format": ("w_bits",), "a_format": ("a_bits",), "kv_format": ("kv_bits", "k_bits", "v_bits")}


def check_formats(cfg, method_cls) -> None:
    """Each ``*_format`` is known, runs with the method, and agrees with its ``*_bits``: a
    non-integer format fixes its element width, so those bits are 16 ("the format decides") or
    that width."""
    for key, bit_keys in FORMAT_KEYS.items():
        name = cfg.get(key) or F.INT.name
        if name not in F.FORMATS:
            raise ConfigError(f"{key}={name}: unknown format{_did_you_mean(str(name), F.NAMES)} "
                              f"(allowed: {', '.join(F.NAMES)})")
        fmt = F.FORMATS[name]
        if fmt.is_integer:
            continue
        if fmt not in method_cls.allowed_formats:
            runs = [m for m, cls in METHODS.items() if fmt in cls.allowed_formats]
            why = f"{fmt}'s {fmt.block}-element blocks are its own grouping; " if fmt.block else ""
            raise ConfigError(f"{key}={fmt}: method {method_cls.name} supports "
                              f"{', '.join(f.name for f in method_cls.allowed_formats)} "
                              f"({why}{fmt} runs with method={' or method='.join(runs)})")
        width = fmt.element_bits
        for bit_key in bit_keys:
            b = cfg.get(bit_key)
            if b is not None and b not in (16, width):
                raise ConfigError(f"{bit_key}={b}: {key}={fmt} has {width}-bit elements; allowed: 16 "
                                  f"(the format decides) or {width}")
    if cfg.backend == "triton":
        for key in ("w_format", "a_format"):
            if not F.lookup(cfg.get(key) or F.INT).is_integer:
                raise ConfigError(f"backend=triton: {key}={cfg[key]}: the Triton kernels hold integer codes; "
                                  f"allowed: backend=torch or backend=auto")


def check_format_blocks(cfg, linear_widths: set[int], head_dim: int) -> None:
    """A block format's blocks must divide the dimension they run along (the reduction axis)."""
    bits = Bits.from_config(cfg)
    for key, quantized, dims, what in (("w_format", bits.w < 16, linear_widths, "the Linear input width"),
                                       ("a_format", bits.a < 16, linear_widths, "the Linear input width"),
                                       ("kv_format", min(bits.k, bits.v) < 16, {head_dim}, "head_dim")):
        fmt = F.lookup(cfg.get(key) or F.INT)
        bad = sorted(d for d in dims if fmt.block and d % fmt.block)
        if quantized and bad:
            raise ConfigError(f"{key}={fmt}: its {fmt.block}-element blocks do not divide {what}={bad[0]} "
                              f"of model {cfg.model.name}; allowed: "
                              f"{', '.join(f.name for f in F.FORMATS.values() if not f.block)}")


def check_config(cfg, method_cls) -> None:
    """Everything that can be checked without loading weights."""
    check_formats(cfg, method_cls)
    bits = _bits(cfg)
    for key, b in bits.items():
        if not isinstance(b, int) or b not in method_cls.allowed_bits:
            shown = "kv_bits" if key in ("k_bits", "v_bits") and cfg.get(key) is None else key
            raise ConfigError(f"{shown}={b}: method {method_cls.name} supports "
                              f"{', '.join(map(str, method_cls.allowed_bits))} bits (16 = not quantized)")
    if "W" not in method_cls.targets:
        for key in ("w_bits", "a_bits"):
            if bits[key] < 16:
                raise ConfigError(f"{key}={bits[key]}: method {method_cls.name} quantizes only the KV cache; "
                                  f"use method=uniform or method=group for weights and activations")
    if cfg.kv_semantics not in method_cls.semantics:
        raise ConfigError(f"kv_semantics={cfg.kv_semantics}: method {method_cls.name} supports "
                          f"{', '.join(method_cls.semantics)}")
    # the types and plain choices of every key are the schema's (qeval.schema), checked first
    if str(cfg.device).startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device}: no CUDA device is visible; use device=cpu or device=auto")
    check_results_dir(cfg.results_dir)
    method_cls.check(cfg)


def hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def looks_local(path) -> bool:
    """A filesystem path rather than a hub id (``org/name``)."""
    p = str(path)
    return p.startswith(("/", ".", "~")) or os.path.exists(p) or p.count("/") > 1


def check_model_available(model_cfg) -> None:
    if model_cfg.get("random_config"):
        return
    path = model_cfg.get("path")
    if not path:
        raise ConfigError(f"model.path={path}: allowed: a hub id (org/name) or a local model directory")
    if looks_local(loading.resolve_path(path)):
        local = Path(loading.resolve_path(path)).expanduser()
        if not local.is_dir() or not (local / "config.json").is_file():
            what = "does not exist" if not local.exists() else "is not a directory" if not local.is_dir() \
                else "has no config.json"
            raise ConfigError(f"model.path={path}: {what}; allowed: a directory holding a Hugging Face model "
                              f"(config.json, weights, tokenizer) or a hub id")
        return
    try:
        if loading.is_available_offline(path):
            return
    except ValueError as e:   # huggingface_hub refuses the id itself
        raise ConfigError(f"model.path={path}: not a hub id (org/name) nor a local directory") from e
    if not hub_reachable():
        raise ConfigError(
            f"model.path={model_cfg.path}: not a local directory and not in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}), and the hub is unreachable; "
            f"pre-download it with `python -m qeval.prefetch {_model_override(model_cfg)}` where there is "
            f"network, or set model.path to a local copy")


def _model_override(model_cfg) -> str:
    """The override that names this model to another qeval command: its config option where one
    holds this path, else the path itself (a model named after its folder has no option)."""
    name = str(model_cfg.get("name"))
    if name in options("model") and option_node("model", name).get("path") == model_cfg.path:
        return f"model={name}"
    return f"model.path={model_cfg.path}"


def _dims(text_cfg) -> tuple[set[int], int]:
    """(input widths of the Linears, head_dim) from an architecture config."""
    hidden = text_cfg.hidden_size
    heads = text_cfg.num_attention_heads
    head_dim = getattr(text_cfg, "head_dim", None) or hidden // heads
    ffn = (getattr(text_cfg, "intermediate_size", None) or getattr(text_cfg, "ffn_dim", None)
           or getattr(text_cfg, "ffn_hidden_size", None) or 4 * hidden)
    return {hidden, ffn, heads * head_dim}, head_dim


def check_against_model(cfg, arch_cfg, method_cls) -> None:
    """Group sizes must divide the dimension they group (the method knows which), and so must a
    block format's blocks."""
    widths, head_dim = _dims(arch_cfg.get_text_config())
    check_format_blocks(cfg, widths, head_dim)
    method_cls.check_model(cfg, widths, head_dim)
    method_cls.check_architecture(cfg, arch_cfg)
    check_attention_route(cfg, arch_cfg, method_cls)
    check_eviction_window(cfg, arch_cfg, method_cls)
    check_fused_decode(cfg, arch_cfg)


def check_keep_layers(cfg, arch_cfg, recipe) -> None:
    """``w_keep_layers`` / ``kv_keep_layers``: indices of the model's decoder layers, each once, for a
    target that is quantized, and a KV cache that can hold a full-precision layer."""
    n = arch_cfg.get_text_config().num_hidden_layers
    b = Bits.from_config(cfg)
    for key, quantized, what in (("w_keep_layers", min(b.w, b.a) < FULL_PRECISION_BITS, "w_bits and a_bits"),
                                 ("kv_keep_layers", min(b.k, b.v) < FULL_PRECISION_BITS, "kv_bits")):
        keep = list(cfg.get(key) or [])
        if not keep:
            continue
        shown = f"{key}=[{', '.join(map(str, keep))}]"
        if bad := [i for i in keep if not -n <= i < n]:
            raise ConfigError(f"{shown}: model {cfg.model.name} has {n} decoder layers, so {bad[0]} is none of "
                              f"them; allowed: indices from {-n} to {n - 1}")
        if len({i % n for i in keep}) < len(keep):
            raise ConfigError(f"{shown}: a layer is named twice (negative indices count from the end); "
                              f"allowed: each layer once")
        if not quantized:
            raise ConfigError(f"{shown}: nothing is quantized there to keep ({what} at 16); allowed: []")
    if cfg.get("kv_keep_layers"):
        shown = f"kv_keep_layers=[{', '.join(map(str, cfg.kv_keep_layers))}]"
        if recipe.evict is not None:
            raise ConfigError(f"{shown}: method {recipe.evict.spec.name} evicts in every layer's cache; allowed: []")
        if recipe.kv_backend == "triton":
            raise ConfigError(f"{shown}: backend=triton decodes every layer on packed words; allowed: "
                              f"backend=torch, or []")


def check_attention_implementation(cfg, arch_cfg) -> None:
    """``attn=sdpa`` on an architecture transformers gives no sdpa path (Gemma-2, whose attention
    soft-caps its scores; BLOOM) would fail while loading: refused before, naming ``eager``."""
    if cfg.get("attn") != "sdpa":
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(arch_cfg), None)
    if cls is not None and getattr(cls, "_supports_sdpa", True) is False:
        raise ConfigError(f"attn=sdpa: model {cfg.model.name} ({arch_cfg.get_text_config().model_type}) has no "
                          f"sdpa attention in transformers ({cls.__name__}); allowed: attn=eager")


def check_fused_weights(cfg, arch_cfg, recipe) -> None:
    """W and WA runs on an architecture whose weights the Linear swap cannot reach (fused MoE
    expert tensors) are refused before load: the architecture is built on the meta device."""
    b = Bits.from_config(cfg)
    if min(b.w, b.a) >= FULL_PRECISION_BITS:
        return
    import torch
    from transformers import AutoModelForCausalLM

    from qeval.model.linear import refuse_fused_weights
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(arch_cfg, trust_remote_code=loading.trusts_remote_code(cfg.model))
    except Exception:   # noqa: BLE001 - an architecture that cannot be built on meta: the loaded model is checked
        return
    refuse_fused_weights(model, recipe, cfg.model.name)


def check_attention_route(cfg, arch_cfg, method_cls) -> None:
    """``simulated`` semantics quantize K/V inside a registered attention function, and eviction
    methods read scores or swap masks in theirs: a model whose attention never calls registered
    functions would measure full precision, or fail after loading. Asked of the model by building
    its architecture on the meta device, never by its family name."""
    b = Bits.from_config(cfg)
    simulated_kv = cfg.kv_semantics == "simulated" and min(b.k, b.v) < FULL_PRECISION_BITS
    if not (simulated_kv or method_cls.evicts) or routes_registered_attention(arch_cfg):
        return
    kind = arch_cfg.get_text_config().model_type
    quantizers = _kv_quantizers()
    if simulated_kv:
        raise ConfigError(f"kv_semantics=simulated: model {cfg.model.name} ({kind}) runs its own attention code, "
                          f"not transformers' AttentionInterface, so K/V would not be quantized; "
                          f"allowed: kv_semantics=cache")
    raise ConfigError(f"method={cfg.method.name}: model {cfg.model.name} ({kind}) runs its own attention code, "
                      f"not transformers' AttentionInterface, which this method's attention function needs; "
                      f"allowed: a method that only quantizes K/V ({', '.join(quantizers)})")


def check_eviction_window(cfg, arch_cfg, spec) -> None:
    """An evicting cache attends through masks of its own (kept slots, sinks and window), which
    replace the mask transformers builds; a sliding-window layer's window would be lost, and a
    layer would see tokens its model never lets it see. Refused until the eviction masks apply it."""
    if not spec.evicts or (window := sliding_window(arch_cfg)) is None:
        return
    kind = arch_cfg.get_text_config().model_type
    raise ConfigError(f"method={cfg.method.name}: model {cfg.model.name} ({kind}) has sliding-window layers "
                      f"(window {window}), whose window the evicting cache's own attention masks would not "
                      f"apply; allowed: a KV method that quantizes ({', '.join(_kv_quantizers())}), or a model "
                      f"whose layers attend to the whole sequence")


def _kv_quantizers() -> list[str]:
    return sorted(n for n, c in METHODS.items() if "KV" in c.targets and not c.evicts)


def check_fused_decode(cfg, arch_cfg) -> None:
    """KV methods on packed words (KIVI, GEAR with backend=triton) decode in a registered attention
    function of their own; a model that never calls it would get only the new token from the
    cache, and a sliding-window layer would attend beyond its window. Under ``backend=auto`` such a
    model's cache stays on torch (the row's ``kv_backend`` says so); asked for explicitly, it is
    refused."""
    if cfg.get("backend", "auto") != "triton" or (problem := fused_decode_problem(arch_cfg)) is None:
        return
    kind = arch_cfg.get_text_config().model_type
    if KV_SLOT not in METHODS[cfg.method.name].parts:
        return
    # the KV part built as the run builds it: only it knows whether its layout fits the kernels
    if build_parts(cfg, (KV_SLOT,), fused_decode=True)[KV_SLOT].columns().get("kv_backend") != "triton":
        return
    raise ConfigError(f"backend=triton: method {cfg.method.name} decodes on packed words in an attention "
                      f"function of its own, and model {cfg.model.name} ({kind}) {problem}; "
                      f"allowed: backend=torch or auto")


@contextmanager
def speaking_as(part):
    """A part's method checks its view, where its node is ``method``: a refusal names the key the
    user wrote (``kv.group_size``, ``transform.smoothquant.alpha``, ``evict=streaming``), not
    ``method.`` or ``method=``."""
    try:
        yield
    except ConfigError as e:
        if part.key == "method":
            raise
        msg = re.sub(r"(?<![\w.])method\.", f"{part.key}.", str(e))
        chosen = f"{part.key}={part.name}" if "." not in part.key else f"transform=[{part.name}]"
        raise ConfigError(re.sub(rf"(?<![\w.])method={re.escape(part.name)}\b", chosen, msg)) from e


def validate(cfg):
    """Every check that needs no weights; returns the architecture config."""
    check_schema(cfg)
    if cfg.method.name not in METHODS:
        raise ConfigError(f"method={cfg.method.name}: no implementation is registered for this method yet "
                          f"(available: {', '.join(sorted(METHODS))})")
    for name in cfg.task:
        if name not in TASKS:
            raise ConfigError(f"task={name}: no implementation is registered for this task yet "
                              f"(available: {', '.join(sorted(TASKS))})")
    views = part_views(cfg)   # each part's method checks its own view: its node, its bits
    for part, view in views:
        with speaking_as(part):
            check_config(view, METHODS[part.name])
    check_recipe(cfg, [(part, build_parts(view, part.slots, fused_decode=True)) for part, view in views])
    check_model_available(cfg.model)
    try:
        arch = loading.model_config(cfg.model)
    # a config.json that is not a config (null, a list, garbage) or a random_config that
    # transformers cannot build: whatever transformers raises on it is one line here
    except Exception as e:
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        if cfg.model.get("random_config"):
            raise ConfigError(f"model.random_config.model_type={cfg.model.random_config.model_type}: transformers "
                              f"cannot build this config ({why}); allowed: an architecture transformers knows, "
                              f"with keys its config takes") from e
        raise ConfigError(f"model.path={cfg.model.path}: not a readable model config ({why})") from e
    for part, view in views:
        with speaking_as(part):
            check_against_model(view, arch, METHODS[part.name])
    check_attention_implementation(cfg, arch)
    recipe = build_recipe(cfg, arch)   # the run's parts, as the run builds them
    check_fused_weights(cfg, arch, recipe)
    check_keep_layers(cfg, arch, recipe)
    # before the tasks: their data may be large
    kv_scales.check(cfg, arch)   # kv_scale=static calibrates too, whatever the parts
    for part, view in views:
        with speaking_as(part):
            calibration.check_published(view, METHODS[part.name])
    if recipe.needs_calibration:
        calibration.check(recipe.calibration_view(), recipe.calibrator(), arch)
    facts = loading.ModelFacts(arch, cfg.model)
    for name, node in cfg.task.items():
        CHECKS[name](name, node, facts)
    _passed.add(_fingerprint(cfg))
    return arch


# the configs this process validated whole: a single run is validated before Hydra starts
# (python -m qeval), and its run must not pay again for the checks that read a tokenizer or index
# lm-eval's tasks; a sweep's cells are validated in their run, once each
_passed: set[str] = set()


def _fingerprint(cfg) -> str:
    """The whole resolved config (results_dir and force included: validation reads them)."""
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)


def validated(cfg) -> bool:
    """Whether this exact config passed :func:`validate` in this process."""
    return _fingerprint(cfg) in _passed
