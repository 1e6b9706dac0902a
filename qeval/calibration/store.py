"""Saved calibration results: ``<results_dir>/calibration/<hash>/``, reused by every later run whose
model, method identity and calibration data hash the same.

The hash covers the model's identity (name, path or hub id, revision, the random config and seed of
a randomly initialised model) and its dtype, what the method says its result depends on
(:meth:`qeval.methods.base.Method.calibration_identity`) and what the samples are
(:meth:`qeval.calibration.data.Spec.identity`); not the device, the tasks or where a local copy of
the data lives. A directory holds ``result.pt`` (the method's result, ``torch.save``) and
``calibration.json`` (the identity, the token count, the seconds it took, the code that wrote it),
each written to a temporary file and renamed, ``calibration.json`` last: its presence marks a
finished result. Computing one is done under the directory's ``.computing`` lock
(:func:`qeval.results.cell_lock`), so two runs needing the same result compute it once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qeval import results
from qeval.calibration.data import Spec

RESULT = "result.pt"
META = "calibration.json"


def model_identity(cfg, dtype: str) -> dict:
    m = cfg.model
    ident = {"name": m.name, "path": m.get("path"), "revision": m.get("revision"), "dtype": dtype}
    if m.get("random_config"):
        # a random model's weights are its config and the run's seed
        ident |= {"random_config": dict(m.random_config), "seed": cfg.seed}
    return ident


def identity(cfg, method_cls, spec: Spec, dtype: str) -> dict:
    return {"model": model_identity(cfg, dtype), "method": method_cls.calibration_identity(cfg),
            "calibration": spec.identity()}


def key(ident: dict) -> str:
    return results.config_hash(json.loads(json.dumps(ident, default=str)))


def directory(cfg, ident: dict) -> Path:
    return Path(str(cfg.results_dir)) / "calibration" / key(ident)


def saved(where: Path) -> bool:
    return (where / META).is_file() and (where / RESULT).is_file()


def read(where: Path) -> tuple[dict, dict]:
    """(result, meta) of a finished directory."""
    meta = json.loads((where / META).read_text())
    return torch.load(where / RESULT, map_location="cpu", weights_only=True), meta


def write(where: Path, result: dict, meta: dict) -> None:
    where.mkdir(parents=True, exist_ok=True)
    with results.replacing(where / RESULT, binary=True) as f:   # atomically, like every run file
        torch.save(result, f)
    results.write_atomic(where / META, json.dumps(meta | {"git_commit": results.git_commit()}, indent=2,
                                                  default=str))
