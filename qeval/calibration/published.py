"""Published calibration results (``method.scales_file``): a file the authors (or Qllm-Eval) ship,
applied instead of calibrating, so no calibration data is read.

Two formats, read with ``torch.load(path, map_location="cpu", weights_only=True)`` only (a pickle
that needs anything but tensors and containers is refused, never executed):

* **llm-awq** ``awq_cache/*.pt`` (mit-han-lab/llm-awq ``awq/quantize/pre_quant.py`` ``run_awq``,
  saved by ``awq/entry.py --dump_awq``; Qllm-Eval's "rep results" for AWQ and SmoothQuant, applied by
  thu-nics/qllm-eval ``qllm_eval/methods/rep/apply_rep.py`` ``apply_awq``):
  ``{"scale": [(prev_op_name, (linear names), scales (C,))], "clip": [(linear name, max_val (out,
  groups, 1))]}``, names as in the Hugging Face model (``model.layers.0.input_layernorm``).
* **SmoothQuant** ``act_scales/*.pt`` (mit-han-lab/smoothquant ``smoothquant/calibration.py``
  ``get_act_scales``, saved by ``examples/generate_act_scales.py``): ``{linear name: max |x| per input
  channel (C,), float32}`` for every Linear (``model.layers.0.self_attn.q_proj``).

The structure is checked here, before any weights load; names and shapes against the model once
it exists (:func:`check_awq`, :func:`check_act_scales`). Every error is one line naming the file
and the entry.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from torch import nn

from qeval.errors import ConfigError

KEY = "method.scales_file"
AWQ = "llm-awq"
ACT_SCALES = "smoothquant-act-scales"
AWQ_SHAPE = ("an llm-awq cache {'scale': [(prev_op, (linears...), scales)], 'clip': [(linear, max_val)]}")
ACT_SHAPE = "a SmoothQuant act_scales dict {linear name: (in_features,) tensor}"
# what torch.load raises on a file that is not a torch checkpoint differs with the bytes it meets
# (a bad magic number, a truncated zip, an unknown pickle opcode), and on a pickle that needs more
# than weights_only allows
_UNLOADABLE = (pickle.UnpicklingError, EOFError, KeyError, IndexError, RuntimeError, ValueError, TypeError,
               AttributeError, ImportError)


def _fail(path, what: str, allowed: str) -> ConfigError:
    return ConfigError(f"{KEY}={path}: {what}; allowed: {allowed}")


def load(path, allowed: str) -> object:
    """The file's object, or one line saying why it cannot be read."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise _fail(path, "no such file" if not p.exists() else "not a file", allowed)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except _UNLOADABLE as e:
        why = str(e).splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise _fail(path, f"not loadable with torch.load(weights_only=True) ({type(e).__name__}: {why})",
                    allowed) from None


def digest(path) -> str:
    """sha256 of the file's bytes: which file a row's numbers came from."""
    h = hashlib.sha256()
    with Path(str(path)).expanduser().open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def kind(obj) -> str | None:
    """Which published format ``obj`` has the shape of (its entries are checked separately)."""
    if isinstance(obj, dict) and {"scale", "clip"} <= set(obj):   # extra keys are refused as an AWQ file's
        return AWQ
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        return ACT_SCALES
    return None


def kind_of_result(result: dict) -> str:
    """The format a method's result from :func:`load` was read in."""
    return AWQ if "scale" in result else ACT_SCALES


def _tensor(x, dims: int) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == dims and x.numel() > 0


def awq_entries(obj, path) -> dict:
    """The llm-awq cache as qeval's AWQ result (lists of tuples, names as strings), structure checked."""
    if kind(obj) == ACT_SCALES:
        raise _fail(path, "is a SmoothQuant act_scales dict (method=smoothquant reads those)", AWQ_SHAPE)
    if kind(obj) != AWQ or not all(isinstance(obj[k], (list, tuple)) for k in ("scale", "clip")):
        raise _fail(path, f"holds a {type(obj).__name__} that is not an llm-awq cache", AWQ_SHAPE)
    if extra := sorted(map(str, set(obj) - {"scale", "clip"})):
        raise _fail(path, f"is an llm-awq cache with other keys too ({', '.join(extra)})", AWQ_SHAPE)
    scale, clip = [], []
    for i, entry in enumerate(obj["scale"]):
        ok = (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)
              and isinstance(entry[1], (list, tuple)) and entry[1] and all(isinstance(n, str) for n in entry[1])
              and _tensor(entry[2], 1))
        if not ok:
            raise _fail(path, f"scale[{i}] is not (prev_op name, (linear names), 1-D float scales)", AWQ_SHAPE)
        if not bool((torch.isfinite(entry[2]) & (entry[2] > 0)).all()):
            # llm-awq asserts its scales are not NaN: a NaN, inf or non-positive scale would divide
            # the weight by it and run to non-finite logits with status ok
            raise _fail(path, f"scale[{i}] ({entry[0]}) holds a value that is not a finite positive number",
                        AWQ_SHAPE)
        scale.append((entry[0], tuple(entry[1]), entry[2]))
    for i, entry in enumerate(obj["clip"]):
        ok = (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
              and _tensor(entry[1], 3) and entry[1].shape[2] == 1)
        if not ok:
            raise _fail(path, f"clip[{i}] is not (linear name, max_val of shape (out, groups, 1))", AWQ_SHAPE)
        if bool((torch.isnan(entry[1]) | (entry[1] < 0)).any()):
            raise _fail(path, f"clip[{i}] ({entry[0]}) holds NaN or a negative max_val", AWQ_SHAPE)
        clip.append((entry[0], entry[1]))
    return {"scale": scale, "clip": clip}


def act_scales(obj, path) -> dict[str, torch.Tensor]:
    """The SmoothQuant act_scales dict, structure checked."""
    if kind(obj) != ACT_SCALES:
        raise _fail(path, f"holds a {type(obj).__name__} that is not a SmoothQuant act_scales dict", ACT_SHAPE)
    for name, t in obj.items():
        if not _tensor(t, 1):
            raise _fail(path, f"entry {name} is not a 1-D float tensor", ACT_SHAPE)
        if not bool((torch.isfinite(t) & (t >= 0)).all()):   # max |x| per channel: finite, never negative
            raise _fail(path, f"entry {name} holds a value that is not a finite number >= 0", ACT_SHAPE)
    return dict(obj)


# ---------------------------------------------------------------------------- against the model
def _module(modules: dict, name: str, where: str, entry: str, model_name: str, want=nn.Module) -> nn.Module:
    m = modules.get(name)
    if m is None:
        raise ConfigError(f"{where}: {entry} names {name}, which model {model_name} does not have; allowed: "
                          f"its module names (e.g. {_example(modules)})")
    if not isinstance(m, want):
        raise ConfigError(f"{where}: {entry} names {name}, a {type(m).__name__}; allowed: an nn.Linear")
    return m


def _example(modules: dict) -> str:
    return next((n for n, m in modules.items() if isinstance(m, nn.Linear)), "?")


def check_awq(model, result: dict, where: str, model_name: str, norms: tuple[str, ...]) -> None:
    """Every name of an AWQ result is a module of ``model`` of the kind its fold needs, and every
    tensor has its module's shape (``where``: the file, for the message)."""
    modules = dict(model.named_modules())
    for i, (prev, names, s) in enumerate(result["scale"]):
        entry = f"scale[{i}]"
        p = _module(modules, prev, where, entry, model_name)
        fcs = [_module(modules, n, where, entry, model_name, nn.Linear) for n in names]
        if isinstance(p, nn.Linear):
            width, what = p.out_features, "output rows"
            fits = s.numel() <= width     # scale_fc_fc scales the last len(s) rows (a fused qkv's v)
        elif type(p).__name__ in norms:
            width, what = p.weight.numel(), "channels"
            fits = s.numel() == width
        else:
            raise ConfigError(f"{where}: {entry} folds into {prev}, a {type(p).__name__}; allowed: an nn.Linear "
                              f"or one of {', '.join(norms)}")
        if not fits or any(fc.in_features != s.numel() for fc in fcs):
            widths = "/".join(str(w) for w in sorted({fc.in_features for fc in fcs}))
            raise ConfigError(f"{where}: {entry} has {s.numel()} scales; allowed: {widths} (the input width of "
                              f"{', '.join(names)}; {prev} has {width} {what})")
    for i, (name, max_val) in enumerate(result["clip"]):
        fc = _module(modules, name, where, f"clip[{i}]", model_name, nn.Linear)
        rows, groups = max_val.shape[:2]
        if rows != fc.out_features or fc.in_features % groups:
            raise ConfigError(f"{where}: clip[{i}] ({name}) has max_val of shape {tuple(max_val.shape)}; allowed: "
                              f"({fc.out_features}, groups dividing {fc.in_features}, 1)")


def check_act_scales(model, scales: dict, needed: list[str], where: str, model_name: str) -> None:
    """Every Linear whose input is smoothed has its entry, of its input width."""
    modules = dict(model.named_modules())
    for name in needed:
        if name not in scales:
            have = next(iter(scales))
            raise ConfigError(f"{where}: has no entry {name} for model {model_name} (its entries are named like "
                              f"{have}); allowed: a file made for this model")
        width = modules[name].in_features
        if scales[name].numel() != width:
            raise ConfigError(f"{where}: entry {name} has {scales[name].numel()} channels; allowed: {width} "
                              f"(the Linear's input width)")
