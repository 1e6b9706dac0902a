"""The run's method object from its configuration: one constructor for validation (which asks
the built method whether its layout fits the packed kernels) and for the run itself."""

from __future__ import annotations

import importlib

from qeval.calibration import kv_scales
from qeval.methods import METHODS
from qeval.methods.base import Bits, Formats, Knobs
from qeval.model import loading
from qeval.model.linear import resolve_backend


def calls_registered_attention(model_type: str) -> bool:
    """Whether the model's attention runs what ``set_attn_implementation`` selects: modeling files
    using ``ALL_ATTENTION_FUNCTIONS`` do; Falcon, MPT, BLOOM (transformers 5) hard-code sdpa / eager."""
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return True   # a layout this check does not know: nothing to say before loading
    return hasattr(module, "ALL_ATTENTION_FUNCTIONS")


def build_method(cfg, arch=None, registered_attention: bool | None = None):
    """The method for ``cfg``; ``arch`` (the model's config, read when needed and not given) says
    whether its attention runs registered functions, unless ``registered_attention`` is given."""
    cls = METHODS[cfg.method.name]
    backend = resolve_backend(cfg.get("backend", "auto"), loading.resolve_device(cfg.device))
    if registered_attention is None:
        registered_attention = True
        if backend == "triton" and "KV" in cls.targets:
            arch = arch if arch is not None else loading.model_config(cfg.model)
            registered_attention = calls_registered_attention(arch.get_text_config().model_type)
    knobs = Knobs(Bits.from_config(cfg), cfg.w_group_size, cfg.a_group_size,
                  cfg.kv_group_size, cfg.kv_semantics, backend,
                  Formats.from_config(cfg), kv_scales.mode(cfg), registered_attention)
    return cls(cfg.method, knobs)
