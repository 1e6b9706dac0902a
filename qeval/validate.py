"""Bad input gets one line naming the key, the value and what is allowed, before any model loads.

Two passes: ``check_overrides`` reads the command line against the config tree (unknown groups,
options and keys, with a did-you-mean) before Hydra composes anything; ``check_config`` reads the
composed config against the method and the model's architecture config (bits, group sizes,
targets, semantics, availability offline).
"""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import yaml
from omegaconf import OmegaConf

from qeval import CONFIG_DIR
from qeval.calibration import stage as calibration
from qeval.errors import ConfigError
from qeval.methods import METHODS
from qeval.methods.base import Bits
from qeval.methods.build import build_method, calls_registered_attention
from qeval.model import loading
from qeval.quant import formats as F
from qeval.tasks import CHECKS, TASKS

GROUPS = ("model", "method", "calibration", "task", "experiment")


def _did_you_mean(value: str, options) -> str:
    close = difflib.get_close_matches(value, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _values(raw: str) -> list[str]:
    raw = raw.strip()
    if raw.startswith(("choice(", "range(", "glob(", "interval(")):
        return []  # sweep functions are left to Hydra
    raw = raw.strip("[]")
    return [v.strip() for v in raw.split(",") if v.strip()]


def check_overrides(argv: list[str]) -> None:
    top = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())
    top_keys = set(top) - {"defaults"}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key.startswith("hydra"):
            continue
        head = key.split(".")[0]
        if key in GROUPS:
            allowed = options(key)
            for v in _values(value):
                if v not in allowed:
                    raise ConfigError(f"{key}={v}: unknown {key}{_did_you_mean(v, allowed)} "
                                      f"(allowed: {', '.join(allowed)})")
        elif head not in top_keys and head not in GROUPS:   # with or without +
            known = sorted(top_keys | set(GROUPS))
            raise ConfigError(f"{key}={value}: unknown key{_did_you_mean(head, known)} "
                              f"(top-level keys: {', '.join(known)})")


def _one_line(e: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line, without their internal details."""
    skip = ("full_key", "object_type", "reference_type", "To append", "Set the environment")
    lines = [l.strip() for l in str(e).splitlines() if l.strip() and not l.strip().startswith(skip)]
    return "; ".join(lines) or type(e).__name__


def check_composes(argv: list[str]) -> None:
    """Every cell the command line asks for composes (Hydra's own errors, as one line), no node
    holds a key its YAML does not define, and results can be written; before Hydra starts, so
    nothing runs or is written."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from qeval.sweep import expand

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "task" and value.strip() in ("[]", ""):
            raise ConfigError(f"task={value}: at least one task (allowed: {', '.join(options('task'))})")
    def composed(cell: list[str]):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=cell)

    try:
        try:
            _check_sweep_has_multirun(argv, overrides, initialize_config_dir, compose)
            cells = expand(overrides)
            configs = [composed(cell) for cell in cells]
        except HydraException as e:
            raise _unknown_override(e, overrides, composed) from e
        for cfg in configs:
            check_results_dir(cfg.results_dir)
            check_known_keys(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e)) from e


def _check_sweep_has_multirun(argv, overrides, initialize_config_dir, compose) -> None:
    """``kv_bits=2,4`` sweeps only under ``-m`` (or an experiment that is a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    sweep = next((o.input_line for o in parsed if o.is_sweep_override()), None)
    if sweep is None or any(a in ("-m", "--multirun") for a in argv):
        return
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        mode = compose("config", overrides=fixed, return_hydra_config=True).hydra.get("mode")
    if str(mode) != "RunMode.MULTIRUN" and str(mode) != "MULTIRUN":
        key, _, value = sweep.partition("=")
        raise ConfigError(f"{sweep}: a sweep needs -m (python -m qeval -m {sweep}); a list is "
                          f"{key}=[{value}]")


def _unknown_override(e: Exception, cell: list[str], composed) -> Exception:
    """Hydra's "Could not override 'method.foo'" as qeval's unknown-key line, naming the keys the
    node has; any other composition error unchanged."""
    first = str(e).splitlines()[0] if str(e) else ""
    if not first.startswith("Could not override '"):
        return e
    key = first.split("'")[1]
    arg = next((a for a in cell if a.lstrip("+~").partition("=")[0] == key), f"{key}=")
    try:   # the node as it composes without the unknown key
        cfg = composed([a for a in cell if a != arg])
        node = OmegaConf.select(cfg, key.rpartition(".")[0])
    except Exception:   # noqa: BLE001 - only a nicer message is at stake; the original stands
        return e
    if node is None or not hasattr(node, "keys"):
        return e
    leaf, known = key.rpartition(".")[2], set(node.keys())
    return ConfigError(f"{key}={arg.partition('=')[2]}: unknown key{_did_you_mean(leaf, known)} "
                       f"({key.rpartition('.')[0]} has: {', '.join(sorted(known))})")


def _bits(cfg) -> dict[str, int]:
    b = Bits.from_config(cfg)
    return {"w_bits": b.w, "a_bits": b.a, "k_bits": b.k, "v_bits": b.v}


FORMAT_KEYS = {"w_format": ("w_bits",), "a_format": ("a_bits",), "kv_format": ("kv_bits", "k_bits", "v_bits")}


def check_formats(cfg, method_cls) -> None:
    """Each ``*_format`` is known, runs with the method, and agrees with its ``*_bits``: a
    non-integer format fixes its element width, so those bits are 16 ("the format decides") or
    that width."""
    for key, bit_keys in FORMAT_KEYS.items():
        fmt = cfg.get(key, F.INT)
        if fmt not in F.FORMATS:
            raise ConfigError(f"{key}={fmt}: unknown format{_did_you_mean(str(fmt), F.FORMATS)} "
                              f"(allowed: {', '.join(F.FORMATS)})")
        if fmt == F.INT:
            continue
        if fmt not in method_cls.allowed_formats:
            runs = [name for name, cls in METHODS.items() if fmt in cls.allowed_formats]
            why = (f"{fmt}'s {F.BLOCKS[fmt]}-element blocks are its own grouping; " if fmt in F.BLOCKS else "")
            raise ConfigError(f"{key}={fmt}: method {method_cls.name} supports {', '.join(method_cls.allowed_formats)} "
                              f"({why}{fmt} runs with method={' or method='.join(runs)})")
        width = F.ELEMENT_BITS[fmt]
        for bit_key in bit_keys:
            b = cfg.get(bit_key)
            if b is not None and b not in (16, width):
                raise ConfigError(f"{bit_key}={b}: {key}={fmt} has {width}-bit elements; allowed: 16 "
                                  f"(the format decides) or {width}")
    if cfg.backend == "triton":
        for key in ("w_format", "a_format"):
            if cfg.get(key, F.INT) != F.INT:
                raise ConfigError(f"backend=triton: {key}={cfg[key]}: the Triton kernels hold integer codes; "
                                  f"allowed: backend=torch or backend=auto")


def check_format_blocks(cfg, linear_widths: set[int], head_dim: int) -> None:
    """A block format's blocks must divide the dimension they run along (the reduction axis)."""
    bits = Bits.from_config(cfg)
    for key, quantized, dims, what in (("w_format", bits.w < 16, linear_widths, "the Linear input width"),
                                       ("a_format", bits.a < 16, linear_widths, "the Linear input width"),
                                       ("kv_format", min(bits.k, bits.v) < 16, {head_dim}, "head_dim")):
        fmt = cfg.get(key, F.INT)
        bad = sorted(d for d in dims if fmt in F.BLOCKS and d % F.BLOCKS[fmt])
        if quantized and bad:
            raise ConfigError(f"{key}={fmt}: its {F.BLOCKS[fmt]}-element blocks do not divide {what}={bad[0]} "
                              f"of model {cfg.model.name}; allowed: {', '.join(f for f in F.FORMATS if f not in F.BLOCKS)}")


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
    for key in ("w_group_size", "a_group_size", "kv_group_size"):
        g = cfg.get(key)
        if g is not None and (not isinstance(g, int) or g <= 0):
            raise ConfigError(f"{key}={g}: must be a positive integer or null")
    if cfg.device not in ("auto", "cpu") and not str(cfg.device).startswith("cuda"):
        raise ConfigError(f"device={cfg.device}: allowed: auto, cpu, cuda, cuda:N")
    if str(cfg.device).startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device}: no CUDA device is visible; use device=cpu or device=auto")
    if cfg.dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ConfigError(f"dtype={cfg.dtype}: allowed: auto, float32, float16, bfloat16")
    if cfg.attn not in ("sdpa", "eager"):
        raise ConfigError(f"attn={cfg.attn}: allowed: sdpa, eager")
    if cfg.backend not in ("auto", "torch", "triton"):
        raise ConfigError(f"backend={cfg.backend}: allowed: auto, torch, triton")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed={cfg.seed}: allowed: an integer")
    if not isinstance(cfg.force, bool):
        raise ConfigError(f"force={cfg.force}: allowed: true, false")
    if cfg.get("resume", "skip") not in ("skip", "strict"):
        raise ConfigError(f"resume={cfg.resume}: allowed: skip, strict")
    if not cfg.task:
        raise ConfigError(f"task=[]: at least one task (allowed: {', '.join(options('task'))})")
    check_results_dir(cfg.results_dir)
    check_known_keys(cfg)
    method_cls.check(cfg)


def check_results_dir(results_dir) -> None:
    """A directory, or a place one can be made: its nearest existing ancestor is a writable
    directory (nothing is created here)."""
    path = Path(str(results_dir)).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"results_dir={results_dir}: exists and is not a directory; allowed: a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"results_dir={results_dir}: {probe} is not writable; allowed: a writable directory")


def yaml_keys(group: str, option: str) -> set[str]:
    """The keys an option's YAML defines (``configs/<group>/<option>.yaml``)."""
    node = yaml.safe_load((CONFIG_DIR / group / f"{option}.yaml").read_text()) or {}
    return set(node) - {"defaults"}


MODEL_KEYS = ("name", "path", "revision", "trust_remote_code", "random_config")


def check_known_keys(cfg) -> None:
    """Every key of the method's and the tasks' nodes is one its YAML defines, so a key added with
    ``+`` (a typo Hydra would otherwise accept) is refused like any unknown key."""
    nodes = [("method", cfg.method, yaml_keys("method", cfg.method.name)),
             ("model", cfg.model, set(MODEL_KEYS))]
    if "calibration" in cfg and cfg.calibration.name in options("calibration"):
        nodes.append(("calibration", cfg.calibration, yaml_keys("calibration", cfg.calibration.name)))
    nodes += [(f"task.{name}", node, yaml_keys("task", name)) for name, node in cfg.task.items()
              if name in options("task")]
    for prefix, node, known in nodes:
        for key in node:
            if key not in known:
                raise ConfigError(f"{prefix}.{key}={node[key]}: unknown key{_did_you_mean(key, known)} "
                                  f"({prefix} has: {', '.join(sorted(known))})")


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
            f"pre-download it with `python scripts/prefetch.py model={model_cfg.name}` where there is "
            f"network, or set model.path to a local copy")


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
    check_fused_decode(cfg, arch_cfg)


def check_fused_decode(cfg, arch_cfg) -> None:
    """KV methods on packed words (KIVI, GEAR with backend=triton) decode in a registered attention
    function; a model that never calls it would get only the new token from the cache. Under
    ``backend=auto`` such a model's cache stays on torch (the row's ``kv_backend`` says so);
    asked for explicitly, it is refused."""
    if cfg.get("backend", "auto") != "triton" or "KV" not in METHODS[cfg.method.name].targets:
        return
    kind = arch_cfg.get_text_config().model_type
    # the method built as the run builds it: only it knows whether its layout fits the kernels
    if calls_registered_attention(kind) or getattr(
            build_method(cfg, registered_attention=True), "kv_backend", "torch") != "triton":
        return
    raise ConfigError(f"backend=triton: method {cfg.method.name} decodes on packed words in a registered "
                      f"attention function, which model {cfg.model.name} ({kind}) never calls; "
                      f"allowed: backend=torch or auto")


def validate(cfg):
    """Every check that needs no weights; returns the architecture config."""
    if cfg.method.name not in METHODS:
        raise ConfigError(f"method={cfg.method.name}: no implementation is registered for this method yet "
                          f"(available: {', '.join(sorted(METHODS))})")
    for name in cfg.task:
        if name not in TASKS:
            raise ConfigError(f"task={name}: no implementation is registered for this task yet "
                              f"(available: {', '.join(sorted(TASKS))})")
    check_config(cfg, METHODS[cfg.method.name])
    check_model_available(cfg.model)
    try:
        arch = loading.model_config(cfg.model)
    except (OSError, ValueError) as e:   # a local folder whose config.json transformers cannot read
        raise ConfigError(f"model.path={cfg.model.path}: not a readable model config "
                          f"({str(e).splitlines()[0][:200]})") from e
    check_against_model(cfg, arch, METHODS[cfg.method.name])
    calibration.check(cfg, METHODS[cfg.method.name], arch)   # before the tasks: their data may be large
    facts = loading.ModelFacts(arch, cfg.model)
    for name, node in cfg.task.items():
        CHECKS[name](name, node, facts)
    return arch
