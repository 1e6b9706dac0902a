"""The local and SLURM launchers (``hydra/launcher=local|slurm``): hydra-submitit-launcher's, except
that a cell killed from outside does not end the sweep.

hydra-submitit-launcher collects results with ``job.results()``, which raises for a job that died
without returning (``kill -9``, the kernel's out-of-memory killer, a node failure, SLURM's hard
kill after the time limit): the sweep then stops with a traceback, prints no summary and never
launches its later batches. Here such a cell is recorded as what it is — a ``failed`` row in its
run directory (naming the launcher's error and the cell's log) and a failed marker — and the sweep
goes on. The next run of the sweep redoes exactly that cell, like any failed cell.

A cell that ended on its own (ok or failed) was recorded by the cell itself and is left alone.

A sweep whose parent is stopped (SIGINT, SIGTERM; :mod:`qeval.sweep.signals`) stops its local
cells: each gets SIGTERM through its submitit controller (again every second, for a cell still
starting), records itself as ``interrupted`` and ends; one that has not ended after
:data:`STOP_GRACE_S` is killed and recorded here. The summary is written all the same and the
parent exits with 130 or 143. The controllers are started with SIGINT ignored, so a Ctrl-C in the
terminal (which reaches every process of the group) stops the cells this way rather than through
the controllers' own handling, which kills a cell one second later and prints a traceback. SLURM
cells are left running (the cluster keeps them; ``scancel`` stops them); their markers arrive as
they finish.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf, open_dict

from qeval import results
from qeval.sweep import signals
from qeval.sweep.callback import close
from qeval.sweep.cells import run_dir_of
from qeval.sweep.summary import MARKER_DIR, record

STOP_GRACE_S = 30.0   # a cell told to stop writes its interrupted row in well under a second
POLL_S = 0.25


@contextmanager
def _sigint_ignored_by_children():
    """Processes started in the block inherit SIGINT ignored (a handler is not inherited; SIG_IGN
    is); a Ctrl-C in these few milliseconds is not heard."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _wait(jobs) -> int | None:
    """Wait until every job is done, or a signal asks the sweep to stop (returned)."""
    while not signals.received and not all(job.done() for job in jobs):
        time.sleep(POLL_S)
    return signals.received


def _kill_cells(job) -> None:
    """SIGKILL the cell processes under a local job's controller (the controller then ends by
    itself); the controller itself where its children cannot be listed."""
    controller = getattr(job, "_process", None)
    if controller is None or controller.poll() is not None:
        return
    try:
        cells = Path(f"/proc/{controller.pid}/task/{controller.pid}/children").read_text().split()
    except OSError:
        cells = []
    for pid in cells:
        with suppress(OSError):
            os.kill(int(pid), signal.SIGKILL)
    if not cells:
        controller.kill()


def stop_local(jobs) -> None:
    """SIGTERM to every running cell through its controller, repeated each second (a cell still
    starting up may not hear the first); after :data:`STOP_GRACE_S`, SIGKILL."""
    deadline = time.monotonic() + STOP_GRACE_S
    while (running := [j for j in jobs if not j.done()]) and time.monotonic() < deadline:
        for job in running:
            controller = getattr(job, "_process", None)
            with suppress(OSError, AttributeError):
                controller.send_signal(signal.SIGTERM)   # the controller forwards it to its cell
        until = min(time.monotonic() + 1.0, deadline)
        while time.monotonic() < until and not all(j.done() for j in running):
            time.sleep(0.05)
    for job in running:
        _kill_cells(job)
    until = time.monotonic() + 5.0
    while time.monotonic() < until and not all(j.done() for j in jobs):
        time.sleep(0.05)


class RecordsKilledCells(BaseSubmititLauncher):
    """Base of ``hydra_plugins.qeval_launchers.{Local,Slurm}Launcher`` (Hydra instantiates launchers
    only from the ``hydra_plugins`` package)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """The plugin's ``launch`` (same executor, same parameters, same job arguments), except
        that a job that died is recorded, not raised, and a stop signal stops the sweep."""
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        if signals.received:   # stopped between two batches: launch nothing more
            close(sweep_dir, signals.received)
        executor = self.executor()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        cells = [list(o) for o in job_overrides]
        local = self._EXECUTOR == "local"
        with _sigint_ignored_by_children() if local else nullcontext():
            jobs = executor.map_array(self, cells, ["hydra.sweep.dir"] * len(cells),
                                      [initial_job_idx + i for i in range(len(cells))],
                                      [f"job_id_for_{initial_job_idx + i}" for i in range(len(cells))],
                                      [Singleton.get_state()] * len(cells))
        stopped_by = _wait(jobs)
        if stopped_by and local:
            stop_local(jobs)
        returns = []
        for i, job in enumerate(jobs):
            if stopped_by and not job.done():
                continue   # a SLURM cell: it goes on, and leaves its own marker
            try:
                returns.append(job.results()[0])
            except Exception as e:  # submitit's UncompletedJobError / FailedJobError: it died
                returns.append(self._record_killed(cells[i], initial_job_idx + i, job, e, stopped_by))
        if stopped_by:
            close(sweep_dir, stopped_by)
        return returns

    def executor(self):
        """A submitit executor with this launcher's parameters, translated as the plugin does: the
        shared keys as they are, the others prefixed with the cluster (``slurm_partition``)."""
        import submitit

        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def _record_killed(self, overrides: list[str], job_num: int, job, e: Exception,
                       stopped_by: int | None = None) -> JobReturn:
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            task_cfg = sweep_config.copy()
            del task_cfg["hydra"]
        run_dir = run_dir_of(task_cfg)
        first = (str(e).strip().splitlines() or [""])[0]
        how = f"interrupted: the sweep was stopped by {signals.name(stopped_by)}, and" if stopped_by else "killed:"
        error = (f"{how} job {job.job_id} ended without a result ({type(e).__name__}: {first}); "
                 f"its log: {job.paths.stderr}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        marker = sweep_dir / MARKER_DIR / f"{job_num:06d}.json"
        with results.cell_lock(run_dir, block=False) as free:
            # the lock is free: the killed process held it and died (flock dies with it); held:
            # another sweep computes this cell now and will write its own result
            if free is not None and results.read_status(run_dir) != "ok":
                from qeval.run import record_failure   # torch: only when a cell really failed
                record_failure(task_cfg, run_dir, error, status="interrupted" if stopped_by else "failed")
        if not marker.exists():
            record(sweep_dir, {"status": "failed", "error": error, "run_dir": str(run_dir), "job": job_num,
                               "overrides": overrides, "seconds": None})
        # COMPLETED, so that Hydra's sweeper (which re-raises a failed job's error) goes on
        job_return = JobReturn(overrides=overrides, cfg=task_cfg, status=JobStatus.COMPLETED)
        job_return.return_value = {"status": "failed", "error": error, "run_dir": str(run_dir)}
        return job_return
