"""The local and SLURM launchers (``hydra/launcher=local|slurm``): hydra-submitit-launcher's, except
that a cell killed from outside does not end the sweep.

hydra-submitit-launcher collects results with ``job.results()``, which raises for a job that died
without returning (``kill -9``, the kernel's out-of-memory killer, a node failure, SLURM's hard
kill after the time limit): the sweep then stops with a traceback, prints no summary and never
launches its later batches. Here such a cell is recorded as what it is — a ``failed`` row in its
run directory (naming the launcher's error and the cell's log) and a failed marker — and the sweep
goes on. The next run of the sweep redoes exactly that cell, like any failed cell.

A cell that ended on its own (ok or failed) was recorded by the cell itself and is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf, open_dict

from qeval import results
from qeval.sweep.cells import run_dir_of
from qeval.sweep.summary import MARKER_DIR, record


class RecordsKilledCells(BaseSubmititLauncher):
    """Base of ``hydra_plugins.qeval_launchers.{Local,Slurm}Launcher`` (Hydra instantiates launchers
    only from the ``hydra_plugins`` package)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """The plugin's ``launch`` (same executor, same parameters, same job arguments), except
        that a job's result is collected one by one and a job that died is recorded, not raised."""
        executor = self.executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        cells = [list(o) for o in job_overrides]
        jobs = executor.map_array(self, cells, ["hydra.sweep.dir"] * len(cells),
                                  [initial_job_idx + i for i in range(len(cells))],
                                  [f"job_id_for_{initial_job_idx + i}" for i in range(len(cells))],
                                  [Singleton.get_state()] * len(cells))
        returns = []
        for i, job in enumerate(jobs):
            try:
                returns.append(job.results()[0])
            except Exception as e:  # submitit's UncompletedJobError / FailedJobError: it died
                returns.append(self._record_killed(cells[i], initial_job_idx + i, job, e))
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

    def _record_killed(self, overrides: list[str], job_num: int, job, e: Exception) -> JobReturn:
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            task_cfg = sweep_config.copy()
            del task_cfg["hydra"]
        run_dir = run_dir_of(task_cfg)
        first = (str(e).strip().splitlines() or [""])[0]
        error = (f"killed: job {job.job_id} ended without a result ({type(e).__name__}: {first}); "
                 f"its log: {job.paths.stderr}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        marker = sweep_dir / MARKER_DIR / f"{job_num:06d}.json"
        with results.cell_lock(run_dir, block=False) as free:
            # the lock is free: the killed process held it and died (flock dies with it); held:
            # another sweep computes this cell now and will write its own result
            finished, _ = results.read_finished(run_dir)
            if free is not None and not (finished and finished.get("status") == "ok"):
                from qeval.run import record_failure   # torch: only when a cell really failed
                record_failure(task_cfg, run_dir, error)
        if not marker.exists():
            record(sweep_dir, {"status": "failed", "error": error, "run_dir": str(run_dir), "job": job_num,
                               "overrides": overrides, "seconds": None})
        # COMPLETED, so that Hydra's sweeper (which re-raises a failed job's error) goes on
        job_return = JobReturn(overrides=overrides, cfg=task_cfg, status=JobStatus.COMPLETED)
        job_return.return_value = {"status": "failed", "error": error, "run_dir": str(run_dir)}
        return job_return
