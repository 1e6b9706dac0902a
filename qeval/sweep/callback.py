"""The Hydra callback registered in ``qeval/configs/config.yaml``. It runs in two places:

* in every cell's process (``on_job_start`` / ``on_job_end``), where it classifies the cell as
  ``done`` (computed now), ``skipped`` (a finished result with the same config hash already
  existed) or ``failed`` (the run wrote a failed row, or the task function raised) and records
  that as the cell's marker;
* in the process that launched the sweep (``on_multirun_start`` / ``on_multirun_end``), where it
  counts the cells before anything runs and reads the markers back at the end into
  ``<sweep dir>/sweep_summary.json`` and one printed line: done, skipped, failed. The process
  exits with status 1 when any cell failed or is missing. Markers and temporary files left in a
  reused sweep folder by an earlier sweep are cleared at the start, so only this sweep's cells
  are counted; the folder is held (``.qeval_sweep.lock``) while the sweep runs, so a second sweep
  given the same folder is refused instead of clearing this one's markers.

A cell killed from outside never reaches ``on_job_end``: qeval's launchers
(:mod:`qeval.sweep.launchers`) record it instead. A sweep stopped by SIGINT or SIGTERM
(:mod:`qeval.sweep.signals`) records its running cells as interrupted (failed markers whose error
says so), writes its summary all the same and exits with 130 or 143: here for cells run in this
process (``hydra/launcher=basic``), in the launcher for the others.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from qeval import results
from qeval.report.escape import cut
from qeval.sweep import signals
from qeval.sweep.cells import count_cells, run_dir_of
from qeval.sweep.summary import (
    MARKER_DIR,
    comparison,
    read_markers,
    read_total,
    record,
    summarize,
    summary_line,
)


def classify(task_cfg: DictConfig, job_return: JobReturn, started: float) -> dict:
    """``done`` / ``skipped`` / ``failed`` for one finished cell, with the error if any."""
    if job_return.status == JobStatus.FAILED:
        try:
            job_return.return_value   # a failed job's return value raises its exception
            err = RuntimeError("the job failed without an exception")
        except Exception as e:  # noqa: BLE001 - any exception a cell raised is its error
            err = e
        return {"status": "failed", "error": f"{type(err).__name__}: {err}", "run_dir": None}
    said = job_return.return_value if isinstance(job_return.return_value, dict) else {}
    if said.get("status") in ("failed", "interrupted") and not said.get("run_dir"):   # ended before writing a row
        return {"status": "failed", "error": said.get("error"), "run_dir": None}
    run_dir = run_dir_of(task_cfg)
    result, problem = results.read_finished(run_dir)
    if result is None or problem:
        return {"status": "failed", "error": problem or "no result.json was written", "run_dir": str(run_dir)}
    if result.get("status") != "ok":   # failed, or interrupted (its error says so)
        return {"status": "failed", "error": result.get("error"), "run_dir": str(run_dir)}
    if said.get("status") in ("ok", "skipped"):   # what the run itself did (it may have waited
        status = "done" if said["status"] == "ok" else "skipped"   # for another sweep's result)
    else:  # a result older than this cell's start was found, not computed
        status = "skipped" if (run_dir / "result.json").stat().st_mtime < started else "done"
    return {"status": status, "error": None, "run_dir": str(run_dir)}


SWEEP_LOCK = ".qeval_sweep.lock"
_held: list = []   # the open sweep lock: held for the process's life, never pickled into a cell


def hold(sweep_dir: Path) -> None:
    """Hold ``sweep_dir`` for this sweep, or end the process with one line: another sweep that is
    still running holds it (the same hydra.sweep.dir given twice)."""
    while _held:   # a process that ran a sweep before (in-process, in a test) holds its folder no more
        _held.pop().close()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    f = open(sweep_dir / SWEEP_LOCK, "a+")  # noqa: SIM115 - held open (locked) until the process ends
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        print(f"qeval: error: the sweep folder {sweep_dir} is in use by a running sweep ({holder}); "
              f"give this one its own hydra.sweep.dir=...", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {platform.node()}\n")
    f.flush()
    _held.append(f)


def close(sweep_dir: Path, stopped_by: int | None = None) -> None:
    """Write ``sweep_summary.json``, print the comparison and the summary, and end the process with
    128 + the signal that stopped the sweep, or with 1 when a cell failed or has no report."""
    s = summarize(sweep_dir, read_total(sweep_dir))
    if stopped_by:
        s["stopped_by"] = signals.name(stopped_by)
    results.write_atomic(sweep_dir / "sweep_summary.json", json.dumps(s, indent=2))
    table = comparison(read_markers(sweep_dir))
    if table:
        print(table, flush=True)
    print(summary_line(s), flush=True)
    for cell in s["failed_cells"]:   # an error may quote anything a user typed: one clean, short line
        print(f"qeval sweep:   failed cell {cell['job']} ({cut(' '.join(cell['overrides']), 300)}): "
              f"{cut(cell['error'], 500)}", flush=True)
    if stopped_by:
        print(f"qeval sweep: stopped by {signals.name(stopped_by)}; running the sweep again finishes it",
              flush=True)
        raise SystemExit(signals.exit_status(stopped_by))
    if s["failed"] or s["missing"]:
        # a sweep with a failed or missing cell did not do what it was asked: say so to the
        # shell and to a job scheduler (SystemExit passes through Hydra's error handling)
        raise SystemExit(1)


class SweepSummary(Callback):
    """Hydra callback: progress per finished cell and a done/skipped/failed summary per sweep."""

    def __init__(self) -> None:
        self._started = time.time()
        self._parent = None   # the pid of the process that launched the sweep

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        signals.noting()   # from here a signal stops the sweep between steps, never mid-write
        self._parent = os.getpid()
        sweep_dir = Path(config.hydra.sweep.dir)
        hold(sweep_dir)
        total = count_cells(config)
        (sweep_dir / MARKER_DIR).mkdir(parents=True, exist_ok=True)
        # a reused sweep folder: an earlier sweep's markers would be counted as this one's cells,
        # and its temporary files (a process killed mid-write) would stay forever
        stale = sorted((sweep_dir / MARKER_DIR).glob("*.json"))
        for leftover in [*stale, *results.temporaries(sweep_dir / MARKER_DIR), *results.temporaries(sweep_dir)]:
            leftover.unlink(missing_ok=True)
        if stale:
            print(f"qeval sweep: {sweep_dir} held {len(stale)} cell markers of an earlier sweep; "
                  f"cleared (their rows stay in the results directory)", flush=True)
        results.write_atomic(sweep_dir / MARKER_DIR / "total", json.dumps(total))
        print(f"qeval sweep: {total if total is not None else '?'} cells -> {sweep_dir}", flush=True)

    def _stop_here(self, config: DictConfig) -> None:
        """In the process that launched the sweep (the basic launcher runs cells in it): once a
        signal came, summarise and end instead of running another cell."""
        if signals.received and os.getpid() == self._parent:
            close(Path(config.hydra.sweep.dir), signals.received)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        signals.noting()   # a launcher's cell process: its stop signal is heard from here on
        self._stop_here(config)
        self._started = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        cell = classify(job_return.cfg, job_return, self._started) | {
            "job": int(config.hydra.job.num), "overrides": list(job_return.overrides or []),
            "seconds": time.time() - self._started}
        record(Path(config.hydra.sweep.dir), cell)
        self._stop_here(config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        close(Path(config.hydra.sweep.dir), signals.received)
