"""A chosen method's parts from the run's configuration: one constructor for validation (which asks
the built parts whether their layout fits the packed kernels) and for the run itself."""

from __future__ import annotations

from qeval.calibration import kv_scales
from qeval.kv.attention import routes_registered_attention
from qeval.methods import METHODS
from qeval.methods.base import Bits, Formats, Knobs
from qeval.model import loading
from qeval.model.linear import resolve_backend


def knobs(cfg, arch=None, registered_attention: bool | None = None) -> Knobs:
    """The run's knobs; ``arch`` (the model's config, read when needed and not given) says whether
    its attention runs registered functions, unless ``registered_attention`` is given."""
    backend = resolve_backend(cfg.get("backend", "auto"), loading.resolve_device(cfg.device))
    if registered_attention is None:
        registered_attention = True
        if backend == "triton" and "KV" in METHODS[cfg.method.name].targets:
            arch = arch if arch is not None else loading.model_config(cfg.model)
            registered_attention = routes_registered_attention(arch)
    return Knobs(Bits.from_config(cfg), cfg.w_group_size, cfg.a_group_size, cfg.kv_group_size, cfg.kv_semantics,
                 backend, Formats.from_config(cfg), kv_scales.mode(cfg), registered_attention,
                 tuple(cfg.get("w_keep_layers") or ()))


def build_parts(cfg, slots, arch=None, registered_attention: bool | None = None) -> dict:
    """slot -> part, for the ``slots`` of ``cfg.method`` (a part's view of the run, or the run)."""
    spec = METHODS[cfg.method.name]
    k = knobs(cfg, arch, registered_attention)
    return {slot: spec.parts[slot](spec, cfg.method, k) for slot in slots}
