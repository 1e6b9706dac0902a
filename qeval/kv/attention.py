"""Attention functions registered with transformers, and the hand-off from cache layer to them.

transformers calls a registered attention function with the module (``module.layer_idx``) but not
the cache. A method whose attention needs the layer that just took this step's K/V (H2O's scores,
fused decode over packed words) has the layer put itself in a :class:`PendingLayers` in
``update`` and the attention function take it back: state lives in qeval objects, never on HF
modules, and a forward without such a cache finds nothing pending and runs the base attention.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import logging

import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

_ids = itertools.count()


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain softmax attention over (B, H, T, D) with GQA key/value heads repeated."""
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def register_attention(kind: str, base: str, make) -> str:
    """Register ``make(attend)`` (an attention function wrapping the ``base`` one: sdpa | eager)
    under a name unique to the run, with the base's mask function; returns the name.

    Every qeval attention function goes through here, so the mask function is never forgotten:
    without it the mask arrives as None and padded batches silently go wrong."""
    attend = {"sdpa": sdpa_attention_forward, "eager": eager_attention}[base]
    name = f"qeval_{kind}_{base}_{next(_ids)}"
    AttentionInterface.register(name, make(attend))
    AttentionMaskInterface.register(name, {"sdpa": sdpa_mask, "eager": eager_mask}[base])
    return name


def attention_mask(allowed: torch.Tensor, base: str, dtype: torch.dtype) -> torch.Tensor:
    """The mask ``base`` attention takes for a bool ``allowed`` (True = may attend): sdpa takes it
    as is, eager adds it, so it becomes 0 where allowed and the dtype's minimum elsewhere."""
    if base == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class PendingLayers:
    """Which cache layer took the current step, per layer index: ``put`` in the layer's
    ``update``, ``take`` in the attention function that runs right after it."""

    def __init__(self):
        self._layers: dict[int, object] = {}

    def put(self, layer_idx: int, layer) -> None:
        self._layers[layer_idx] = layer

    def take(self, layer_idx: int):
        return self._layers.pop(layer_idx, None)


_PROBE = "qeval_probe_sdpa"
_probe_calls = [0]
_routes: dict[str, bool] = {}   # architecture config (JSON) -> answer; a sweep asks once per model


def _probe(module, query, key, value, attention_mask, **kwargs):
    _probe_calls[0] += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def routes_registered_attention(arch_config) -> bool:
    """Whether a model of this architecture runs the attention function ``set_attn_implementation``
    selects, found by what the model does rather than by its family name: the architecture is built
    on the meta device (no memory, no weights), switched to a counting function and run on two
    tokens. Falcon, for one, ignored registered functions before transformers 5.25 and calls them
    since; BLOOM and MPT still hard-code their attention. Where a modeling file cannot run on the
    meta device, its module is read instead."""
    key = arch_config.to_json_string()
    if key not in _routes:
        try:
            _routes[key] = _count_probe_calls(copy.deepcopy(arch_config)) > 0
        except Exception:  # noqa: BLE001 - a modeling file that cannot run on meta tensors
            # (older transformers: autocast on the meta device, .item() in OPT's positions); its
            # source then says whether it looks attention functions up; the loaded model's own
            # check (qeval.kv.simulated.install) stays the last word
            _routes[key] = _module_reads_the_interface(arch_config)
    return _routes[key]


def sliding_window(arch_config) -> int | None:
    """The attention window of the model's sliding-window layers, or None when every layer attends
    to the whole sequence. Read from the text config as transformers reads it: ``layer_types``
    naming ``sliding_attention`` layers (Gemma-2/3, Qwen2 with ``use_sliding_window``), or a
    ``sliding_window`` applied to every layer by a config without layer types (Mistral-7B-v0.1)."""
    text = arch_config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if window is None or getattr(text, "use_sliding_window", True) is False:
        return None
    types = getattr(text, "layer_types", None)
    if types and "sliding_attention" not in types:
        return None
    return int(window)


def _module_reads_the_interface(arch_config) -> bool:
    """Whether the causal-LM class's modeling module looks attention functions up (True when it
    cannot be told: the loaded model is checked again)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(arch_config)]
    except KeyError:
        return True
    return hasattr(importlib.import_module(cls.__module__), "ALL_ATTENTION_FUNCTIONS")


def _count_probe_calls(arch_config) -> int:
    AttentionInterface.register(_PROBE, _probe)
    AttentionMaskInterface.register(_PROBE, sdpa_mask)
    hf_logger = logging.getLogger("transformers")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)   # "does not support setting its attention implementation" is the answer
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(arch_config)
        model.set_attn_implementation(_PROBE)
        before = _probe_calls[0]
        with torch.no_grad():
            model(input_ids=torch.ones(1, 2, dtype=torch.long, device="meta"))
        return _probe_calls[0] - before
    finally:
        hf_logger.setLevel(level)
