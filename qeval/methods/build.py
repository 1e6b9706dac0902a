"""A chosen method's parts from the run's configuration: one constructor for validation (which asks
the built parts whether their layout fits the packed kernels) and for the run itself."""

from __future__ import annotations

from qeval.calibration import kv_scales
from qeval.kv.attention import routes_registered_attention, sliding_window
from qeval.methods import METHODS
from qeval.methods.base import Bits, Formats, Knobs
from qeval.model import loading
from qeval.model.linear import resolve_backend


def knobs(cfg, arch=None, fused_decode: bool | None = None) -> Knobs:
    """The run's knobs; ``arch`` (the model's config, read when needed and not given) says whether
    a packed KV cache may decode in its own attention function (:func:`fused_decode_problem`),
    unless ``fused_decode`` is given."""
    backend = resolve_backend(cfg.get("backend", "auto"), loading.resolve_device(cfg.device))
    if fused_decode is None:
        fused_decode = True
        if backend == "triton" and "KV" in METHODS[cfg.method.name].targets:
            arch = arch if arch is not None else loading.model_config(cfg.model)
            fused_decode = fused_decode_problem(arch) is None
    return Knobs(Bits.from_config(cfg), cfg.w_group_size, cfg.a_group_size, cfg.kv_group_size, cfg.kv_semantics,
                 backend, Formats.from_config(cfg), kv_scales.mode(cfg), fused_decode,
                 tuple(cfg.get("w_keep_layers") or ()))


def fused_decode_problem(arch) -> str | None:
    """Why a packed KV cache cannot decode in its own attention function on this architecture, or
    None: the model must call registered attention functions, and attend to every token it holds
    (a sliding-window layer attends to its last W only, which the fused decode does not apply)."""
    if not routes_registered_attention(arch):
        return "never calls it (its attention code does not use transformers' AttentionInterface)"
    if (window := sliding_window(arch)) is not None:
        return (f"has sliding-window layers (window {window}), which the fused decode would let attend to "
                f"every held token")
    return None


def build_parts(cfg, slots, arch=None, fused_decode: bool | None = None) -> dict:
    """slot -> part, for the ``slots`` of ``cfg.method`` (a part's view of the run, or the run)."""
    spec = METHODS[cfg.method.name]
    k = knobs(cfg, arch, fused_decode)
    return {slot: spec.parts[slot](spec, cfg.method, k) for slot in slots}
