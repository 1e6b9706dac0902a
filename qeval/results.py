"""Rows, run identity and atomic writes.

A row is one measured number with every knob that produced it flattened beside it. A run's
identity is the hash of its resolved config minus launcher and output keys, so a rerun can skip
what is done; tables are then one ``pivot_table`` away and no config is ever parsed back out of a
directory name.

Every file of a finished run is checked when read (:func:`read_finished`), never trusted: a file
of the wrong kind, a changed byte, a truncated write is named in one line and the cell is redone.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import stat
import subprocess
import time
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path

# the file primitives a run's files are built on; callers name them as results.* too
from qeval.files.atomic import (  # noqa: F401
    DiskFull,
    disk_full,
    make_directory,
    move_aside,
    replacing,
    temporaries,
    write_atomic,
    write_files,
)
from qeval.files.checked import (  # noqa: F401
    NotAFile,
    problem_reading,
    read_bytes,
    seal_matches,
    sealed,
)

log = logging.getLogger(__name__)

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


def rows_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, default=str) + "\n" for r in rows)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _lock_descriptor(path: Path, exclusive: bool) -> int | None:
    """A descriptor of the lock file ``path``, opened without blocking (a FIFO there is never
    waited on). What is not a regular file there is moved aside by a writer (``exclusive``); a
    reader goes without the lock (None), as it does where it may not write."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if not exclusive:
                return None
            if e.errno != errno.EISDIR:
                raise
            move_aside(path)
            continue
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
        if not exclusive:
            return None
        move_aside(path)
    raise OSError(errno.EEXIST, f"{path} keeps being replaced by something that is not a file")


@contextmanager
def run_lock(run_dir: Path, exclusive: bool):
    """An advisory lock on ``<run_dir>/.lock``: writers of a run's files hold it exclusively and
    readers shared, so two processes finishing the same cell at once never leave (or read) rows of
    one beside the result.json of the other."""
    if exclusive:
        make_directory(run_dir)
    fd = _lock_descriptor(run_dir / ".lock", exclusive)
    if fd is None:
        yield
        return
    with open(fd, "rb"):   # closing the descriptor releases the lock
        if exclusive:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            _wait_shared(fd, run_dir)
        yield


# a writer holds a run's lock while it renames its files into place (milliseconds; seconds for
# very many rows); a reader that waits longer is facing a stuck or hostile process, not a writer
READ_WAIT_S = 60.0


class LockHeld(OSError):
    """A run's files stayed locked by a writer for longer than :data:`READ_WAIT_S`."""


def _wait_shared(fd: int, run_dir: Path) -> None:
    deadline = time.monotonic() + READ_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise LockHeld(errno.EWOULDBLOCK, f"{run_dir / '.lock'} held by a writer for more than "
                                                  f"{READ_WAIT_S:.0f} s") from None
            time.sleep(0.05)


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
    make_directory(run_dir)
    fd = _lock_descriptor(run_dir / ".computing", exclusive=True)
    with open(fd, "r+") as f:
        waited = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not block:
                yield None
                return
            holder = f.read().strip() or "another process"
            log.info(f"qeval: {run_dir.name} is being computed by {holder}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        with suppress(OSError):   # a note for a waiting process; a full disk must not stop the cell
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {platform.node()}\n")
            f.flush()
        for leftover in temporaries(run_dir):
            leftover.unlink(missing_ok=True)
        yield waited


def write_run(run_dir: Path, result: dict, rows: list[dict], config_yaml: str) -> None:
    """config.yaml, rows.jsonl, then result.json, under the run's lock, every temporary written
    before any is renamed (a full disk changes nothing). result.json records the rows' count and
    checksum, config.yaml's checksum, the code that wrote them and, sealed in, its own checksum,
    so a finished cell is checked when read rather than trusted."""
    text = rows_text(rows)
    result = sealed(result | {"rows_count": len(rows), "rows_sha256": digest(text),
                              "config_sha256": digest(config_yaml), "git_commit": git_commit(),
                              "qeval_version": library_versions()["qeval"]})
    with run_lock(run_dir, exclusive=True):
        # result.json last: its presence with status "ok" marks the run as finished
        write_files([(run_dir / "config.yaml", config_yaml), (run_dir / "rows.jsonl", text),
                     (run_dir / "result.json", json.dumps(result, indent=2))])


class UnreadableRun(ValueError):
    """A run directory whose files do not agree; the message names the file and what is wrong."""


def read_finished(run_dir: Path) -> tuple[dict | None, str | None]:
    """(result.json, problem): (None, None) while the run has not finished; a problem when a file
    is not a file, result.json is unreadable, not an object or changed, or rows.jsonl or
    config.yaml is missing, truncated or not what result.json recorded."""
    if not os.path.lexists(run_dir / "result.json"):
        return None, None
    try:
        with run_lock(run_dir, exclusive=False):
            return _read_finished(run_dir)
    except LockHeld as e:
        return None, str(e.strerror)


def _read_finished(run_dir: Path) -> tuple[dict | None, str | None]:
    path = run_dir / "result.json"
    data, problem = problem_reading(path)
    if data is None:
        return None, None if problem == f"{path} is missing" else problem
    try:
        result = json.loads(data)
    except ValueError as e:   # truncated, garbled, not UTF-8
        return None, f"{path} is not JSON ({type(e).__name__})"
    if not isinstance(result, dict):
        return None, f"{path} holds a JSON {type(result).__name__}, not an object"
    if not seal_matches(result):
        return None, f"{path} does not match the checksum it was written with (changed or damaged)"
    rows_path = run_dir / "rows.jsonl"
    data, problem = problem_reading(rows_path)
    if problem:
        return result, problem
    if "rows_sha256" in result:
        if hashlib.sha256(data).hexdigest() != result["rows_sha256"] or data.count(b"\n") != result.get("rows_count"):
            return result, (f"{rows_path} does not hold the {result.get('rows_count')} rows "
                            f"result.json recorded (changed or truncated)")
    elif problem := _unchecked_rows_problem(result, data, rows_path):
        return result, problem
    if "config_sha256" in result:
        data, problem = problem_reading(run_dir / "config.yaml")
        if problem or hashlib.sha256(data).hexdigest() != result["config_sha256"]:
            return result, problem or (f"{run_dir / 'config.yaml'} is not the config result.json recorded "
                                       f"(changed or truncated)")
    return result, None


def _unchecked_rows_problem(result: dict, data: bytes, path: Path) -> str | None:
    """Rows written before checksums: every line must parse, and there must be some (an empty
    file beside such a result.json may be a write that never finished)."""
    try:
        n = len([json.loads(line) for line in data.decode().splitlines() if line.strip()])
    except ValueError:
        return f"{path} has a line that is not JSON"
    if n == 0:
        return f"{path} holds no rows (written before checksums, so nothing says that is complete)"
    if isinstance(result.get("rows"), list) and len(result["rows"]) != n:
        return f"{path} holds {n} rows, result.json lists {len(result['rows'])}"
    return None


def read_rows(run_dir: Path) -> list[dict]:
    """The rows of a finished run, checked against result.json; [] while it is unfinished."""
    if not os.path.lexists(run_dir / "result.json"):
        return []
    with run_lock(run_dir, exclusive=False):   # result.json and rows.jsonl of the same writer
        result, problem = _read_finished(run_dir)
        if problem:
            raise UnreadableRun(problem)
        if result is None:
            return []
        text = read_bytes(run_dir / "rows.jsonl").decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_status(run_dir: Path) -> str | None:
    """``ok`` / ``failed`` / ``interrupted`` of a finished run whose files agree; None otherwise."""
    result, problem = read_finished(run_dir)
    return None if result is None or problem else result.get("status")
