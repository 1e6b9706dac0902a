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

from qeval.errors import ConfigError
from qeval.methods import METHODS
from qeval.methods.base import Bits
from qeval.model import loading
from qeval.tasks import TASKS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "method", "task", "experiment")


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
        elif head not in top_keys and head not in GROUPS and not arg.startswith("+"):
            known = sorted(top_keys | set(GROUPS))
            raise ConfigError(f"{key}={value}: unknown key{_did_you_mean(head, known)} "
                              f"(top-level keys: {', '.join(known)})")


def _bits(cfg) -> dict[str, int]:
    b = Bits.from_config(cfg)
    return {"w_bits": b.w, "a_bits": b.a, "k_bits": b.k, "v_bits": b.v}


def check_config(cfg, method_cls) -> None:
    """Everything that can be checked without loading weights."""
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


def check_model_available(model_cfg) -> None:
    if model_cfg.get("random_config") or loading.is_available_offline(model_cfg.path):
        return
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
    """Group sizes must divide the dimension they group: the method knows which."""
    widths, head_dim = _dims(arch_cfg.get_text_config())
    method_cls.check_model(cfg, widths, head_dim)


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
    arch = loading.model_config(cfg.model)
    check_against_model(cfg, arch, METHODS[cfg.method.name])
    return arch
