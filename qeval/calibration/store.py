"""Saved calibration results: ``<results_dir>/calibration/<hash>/``, reused by every later run whose
model, method identity and calibration data hash the same.

The hash covers the model's identity (name, path or hub id, revision, the random config and seed of
a randomly initialised model) and its dtype, what the method says its result depends on
(``calibration_identity`` of the method's row, :class:`qeval.methods.spec.Spec`) and what the samples are
(:meth:`qeval.calibration.data.Spec.identity`); not the device, the tasks or where a local copy of
the data lives. A directory holds ``result.pt`` (the method's result, ``torch.save``) and
``calibration.json`` (the identity, the token count, the seconds it took, the code that wrote it,
the result file's size and checksum, and its own checksum), each written to a temporary file and
renamed, ``calibration.json`` last: its presence marks a finished result. Computing one is done
under the directory's ``.computing`` lock (:func:`qeval.results.cell_lock`), so two runs needing
the same result compute it once.

A saved result is checked before it is used, never trusted: :func:`unusable` says why one cannot
be (a file missing, of the wrong kind, truncated, changed or garbled, or computed for another
identity), and the stage then computes it again. Results saved before checksums are used when
their identity matches and they load.
"""

from __future__ import annotations

import json
import os
import stat
from contextlib import suppress
from pathlib import Path

import torch

from qeval import results
from qeval.calibration.data import Spec
from qeval.files.atomic import make_directory
from qeval.files.checked import (
    kind,
    problem_reading,
    read_bytes,
    seal_matches,
    sealed,
    sha256_of,
)

RESULT = "result.pt"
META = "calibration.json"


def model_identity(cfg, dtype: str) -> dict:
    m = cfg.model
    ident = {"name": m.name, "path": m.get("path"), "revision": m.get("revision"), "dtype": dtype}
    if m.get("random_config"):
        # a random model's weights are its config and the run's seed
        ident |= {"random_config": dict(m.random_config), "seed": cfg.seed}
    return ident


def identity(cfg, calibrator, spec: Spec, dtype: str) -> dict:
    """``calibrator``: what the stage runs (the recipe's calibrated parts, or ``kv_scale=static``'s
    amax), asked for what its result depends on."""
    return {"model": model_identity(cfg, dtype), "method": calibrator.calibration_identity(cfg),
            "calibration": spec.identity()}


def key(ident: dict) -> str:
    return results.config_hash(json.loads(json.dumps(ident, default=str)))


def directory(cfg, ident: dict) -> Path:
    return Path(str(cfg.results_dir)) / "calibration" / key(ident)


NOT_SAVED = "nothing is saved there"


def saved(where: Path) -> bool:
    return (where / META).is_file() and (where / RESULT).is_file()


class Unusable(ValueError):
    """A saved result that cannot be used; the message says why."""


def _plain(ident: dict) -> dict:
    return json.loads(json.dumps(ident, default=str))   # as calibration.json holds it


def unusable(where: Path, ident: dict) -> str | None:
    """Why the result saved in ``where`` cannot be used for ``ident`` (:data:`NOT_SAVED` when none
    is); None when it can, as far as its files' kinds, sizes and recorded identity show."""
    data, problem = problem_reading(where / META)
    if data is None:
        return NOT_SAVED if problem == f"{where / META} is missing" else problem
    try:
        meta = json.loads(data)
    except ValueError as e:
        return f"{META} is not JSON ({type(e).__name__}: truncated or garbled)"
    if not isinstance(meta, dict):
        return f"{META} holds a JSON {type(meta).__name__}, not an object"
    if not seal_matches(meta):
        return f"{META} does not match the checksum it was written with (changed or damaged)"
    if meta.get("identity") != _plain(ident):
        return f"it was computed for another model, method or data ({META}'s identity differs)"
    try:
        st = os.stat(where / RESULT)
    except FileNotFoundError:
        return f"{RESULT} is missing"
    if not stat.S_ISREG(st.st_mode):
        return f"{RESULT} is {kind(st.st_mode)}, not a file"
    if "result_bytes" in meta and st.st_size != meta["result_bytes"]:
        return f"{RESULT} holds {st.st_size} bytes, {META} recorded {meta['result_bytes']} (truncated or replaced)"
    return None


def read(where: Path, ident: dict) -> tuple[dict, dict]:
    """(result, meta) of a finished directory, checked in full; :class:`Unusable` says why not."""
    if why := unusable(where, ident):
        raise Unusable(why)
    meta = json.loads(read_bytes(where / META))
    if "result_sha256" in meta and sha256_of(where / RESULT) != meta["result_sha256"]:
        raise Unusable(f"{RESULT} does not match the checksum {META} recorded (changed or damaged)")
    try:
        return torch.load(where / RESULT, map_location="cpu", weights_only=True), meta
    except Exception as e:  # whatever torch makes of a garbled file, it is unusable
        raise Unusable(f"{RESULT} cannot be loaded ({type(e).__name__})") from e


def write(where: Path, result: dict, meta: dict) -> None:
    """result.pt, then calibration.json sealed with result.pt's size and checksum; the old
    calibration.json goes first, so a write cut short leaves nothing that looks finished."""
    make_directory(where)
    with suppress(FileNotFoundError, IsADirectoryError):   # a directory there is moved aside below
        (where / META).unlink()
    with results.replacing(where / RESULT, binary=True) as f:   # atomically, like every run file
        torch.save(result, f)
    meta = meta | {"result_bytes": (where / RESULT).stat().st_size, "result_sha256": sha256_of(where / RESULT),
                   "git_commit": results.git_commit()}
    results.write_atomic(where / META, json.dumps(sealed(meta), indent=2))
