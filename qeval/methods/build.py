"""The run's method object from its configuration: one constructor for validation (which asks
the built method whether its layout fits the packed kernels) and for the run itself."""

from __future__ import annotations

from qeval.calibration import kv_scales
from qeval.kv.attention import routes_registered_attention
from qeval.methods import METHODS
from qeval.methods.base import Bits, Formats, Knobs
from qeval.model import loading
from qeval.model.linear import resolve_backend


def build_method(cfg, arch=None, registered_attention: bool | None = None):
    """The method for ``cfg``; ``arch`` (the model's config, read when needed and not given) says
    whether its attention runs registered functions, unless ``registered_attention`` is given."""
    cls = METHODS[cfg.method.name]
    backend = resolve_backend(cfg.get("backend", "auto"), loading.resolve_device(cfg.device))
    if registered_attention is None:
        registered_attention = True
        if backend == "triton" and "KV" in cls.targets:
            arch = arch if arch is not None else loading.model_config(cfg.model)
            registered_attention = routes_registered_attention(arch)
    knobs = Knobs(Bits.from_config(cfg), cfg.w_group_size, cfg.a_group_size,
                  cfg.kv_group_size, cfg.kv_semantics, backend,
                  Formats.from_config(cfg), kv_scales.mode(cfg), registered_attention,
                  tuple(cfg.get("w_keep_layers") or ()))
    return cls(cfg.method, knobs)
