"""Rows, run identity and atomic writes.

A row is one measured number with every knob that produced it flattened beside it. A run's
identity is the hash of its resolved config minus launcher and output keys, so a rerun can skip
what is done; tables are then one ``pivot_table`` away and no config is ever parsed back out of a
directory name.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

# per-task breakdown columns: a row with any of them set is a detail (a passkey cell, one layer of
# quant_error, one kind of toy question), not a headline number
DETAIL_COLUMNS = ("length", "depth", "layer", "operation", "question_type")


def is_headline(row: dict) -> bool:
    """The task's overall numbers: no breakdown, and for lm-eval the task's own (group) row."""
    return all(row.get(c) is None for c in DETAIL_COLUMNS) and row.get("subtask") in (None, row.get("task"))


# keys that say where or how a run is launched, not what it computes
NON_IDENTITY_KEYS = ("hydra", "results_dir", "force", "resume")


def config_hash(cfg: dict) -> str:
    ident = {k: v for k, v in cfg.items() if k not in NON_IDENTITY_KEYS}
    blob = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("qeval", "torch", "transformers", "lm_eval", "triton", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def device_name(device) -> str:
    import torch
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextmanager
def replacing(path: Path, binary: bool = False):
    """A file to write ``path``'s new contents into: a temporary in the same directory, synced and
    renamed onto ``path`` when the block ends, removed if it raises, so readers never see half.
    Its name is what :func:`temporaries` finds, so a killed writer's leftover is cleaned up."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a shared results directory must stay readable
        with os.fdopen(fd, "wb" if binary else "w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`replacing`: readers never see half."""
    with replacing(path) as f:
        f.write(text)


def rows_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, default=str) + "\n" for r in rows)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@contextmanager
def run_lock(run_dir: Path, exclusive: bool):
    """An advisory lock on ``<run_dir>/.lock``: writers of a run's files hold it exclusively and
    readers shared, so two processes finishing the same cell at once never leave (or read) rows of
    one beside the result.json of the other."""
    if exclusive:
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        f = open(run_dir / ".lock", "a")
    except OSError:
        if exclusive:
            raise
        yield   # a results directory this reader may not write: read it as it is
        return
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def temporaries(directory: Path) -> list[Path]:
    """The temporary files :func:`write_atomic` leaves in ``directory`` when its process is killed
    between writing and renaming (only a process that owns the directory may delete them)."""
    return sorted(directory.glob(".*.tmp")) if directory.is_dir() else []


@contextmanager
def cell_lock(run_dir: Path, block: bool = True):
    """Hold ``<run_dir>/.computing`` exclusively while a cell is computed, so two sweeps sharing a
    results directory never compute one cell twice: the second waits, then finds it finished.

    Yields True when it had to wait for another process, False when the cell was free, and None
    when ``block`` is false and another process holds it. ``flock`` is released by the kernel when
    its holder dies, so a killed cell never leaves a stale lock; on NFS, Linux maps it to POSIX
    byte-range locks, which the NFS lock manager shares between machines. The file holds the
    holder's host and pid, for the message a waiting process prints. On entry, the temporaries a
    killed writer of this cell left behind are removed: every writer of a run directory holds
    this lock.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".computing", "a+") as f:
        waited = False
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not block:
                yield None
                return
            f.seek(0)
            holder = f.read().strip() or "another process"
            logging.getLogger(__name__).info(f"qeval: {run_dir.name} is being computed by {holder}; waiting for it")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            waited = True
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {platform.node()}\n")
            f.flush()
            for leftover in temporaries(run_dir):
                leftover.unlink(missing_ok=True)
            yield waited
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_run(run_dir: Path, result: dict, rows: list[dict], config_yaml: str) -> None:
    """config.yaml, rows.jsonl, then result.json, each atomically and all under the run's lock.
    result.json records how many rows there are, their checksum and the code that wrote them, so
    a finished cell is checked when read rather than trusted."""
    text = rows_text(rows)
    result = result | {"rows_count": len(rows), "rows_sha256": digest(text), "git_commit": git_commit(),
                       "qeval_version": library_versions()["qeval"]}
    with run_lock(run_dir, exclusive=True):
        write_atomic(run_dir / "config.yaml", config_yaml)
        write_atomic(run_dir / "rows.jsonl", text)
        # result.json last: its presence with status "ok" marks the run as finished
        write_atomic(run_dir / "result.json", json.dumps(result, indent=2, default=str))


class UnreadableRun(ValueError):
    """A run directory whose files do not agree; the message names the file and what is wrong."""


def read_finished(run_dir: Path) -> tuple[dict | None, str | None]:
    """(result.json, problem): (None, None) while the run has not finished; a problem when
    result.json is unreadable or rows.jsonl is missing, truncated or not the rows it recorded."""
    if not (run_dir / "result.json").exists():
        return None, None
    with run_lock(run_dir, exclusive=False):
        return _read_finished(run_dir)


def _read_finished(run_dir: Path) -> tuple[dict | None, str | None]:
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        return None, f"{run_dir / 'result.json'} is unreadable ({type(e).__name__})"
    try:
        text = (run_dir / "rows.jsonl").read_text()
    except OSError:
        return result, f"{run_dir / 'rows.jsonl'} is missing"
    if "rows_sha256" in result:
        if digest(text) != result["rows_sha256"] or text.count("\n") != result.get("rows_count"):
            return result, (f"{run_dir / 'rows.jsonl'} does not hold the {result.get('rows_count')} rows "
                            f"result.json recorded (changed or truncated)")
    else:   # written before checksums: every line must at least parse
        try:
            [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            return result, f"{run_dir / 'rows.jsonl'} has a line that is not JSON"
    return result, None


def read_rows(run_dir: Path) -> list[dict]:
    """The rows of a finished run, checked against result.json; [] while it is unfinished."""
    if not (run_dir / "result.json").exists():
        return []
    with run_lock(run_dir, exclusive=False):   # result.json and rows.jsonl of the same writer
        result, problem = _read_finished(run_dir)
        if problem:
            raise UnreadableRun(problem)
        text = (run_dir / "rows.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_status(run_dir: Path) -> str | None:
    """``ok`` / ``failed`` of a finished run whose files agree; None otherwise."""
    result, problem = read_finished(run_dir)
    return None if result is None or problem else result.get("status")
