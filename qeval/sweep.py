"""Sweep bookkeeping: how many cells a sweep has, which are finished, and a closing summary.

Registered as a Hydra callback in ``configs/config.yaml``. It runs in two places:

* in every cell's process (``on_job_start`` / ``on_job_end``), where it classifies the cell as
  ``done`` (computed now), ``skipped`` (a finished result with the same config hash already
  existed) or ``failed`` (the run wrote a failed row, or the task function raised), writes that
  as one small marker file under ``<sweep dir>/.qeval_cells/`` and prints ``[k/N finished]``;
* in the process that launched the sweep (``on_multirun_start`` / ``on_multirun_end``), where it
  counts the cells before anything runs and reads the markers back at the end into
  ``<sweep dir>/sweep_summary.json`` and one printed line: done, skipped, failed. The process
  exits with status 1 when any cell failed or is missing. Markers left in a reused sweep folder
  by an earlier sweep are cleared at the start, so only this sweep's cells are counted.

Markers are files, not shared memory, because the submitit launchers run cells in separate
processes (or on separate machines sharing a file system). A cell killed from outside (SLURM
time limit, the kernel's out-of-memory killer) leaves no marker and is reported as ``missing``;
its run directory has no finished ``result.json``, so the next run of the sweep redoes it.

``python -m qeval.sweep <sweep dir>`` prints where a sweep stands (useful while a SLURM array runs).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qeval import CONFIG_DIR, results

MARKER_DIR = ".qeval_cells"
STATUSES = ("done", "skipped", "failed")


def expand(overrides: Sequence[str], params: Mapping[str, object] | None = None) -> list[list[str]]:
    """The cells of the sweep that ``overrides`` (a ``python -m qeval`` command line) describes, in
    launch order, each as the override list the basic sweeper launches it with.

    The arguments are the experiment's ``hydra.sweeper.params`` followed by the command line, and
    the cells are their product exactly as Hydra's ``BasicSweeper`` takes it: ``k=a,b`` and
    ``k=choice(a,b)`` sweep ``k`` over ``a`` and ``b``; a plain ``k=v`` is in every cell; a key
    given on the command line replaces the experiment's value for it, in the experiment's place in
    the order (``kv_bits=4`` runs only 4 bits, ``kv_bits=2,4`` only those two).

    ``params`` are the ``hydra.sweeper.params`` to use, for a caller that already has the composed
    config (a Hydra callback). Without them, they are read from the config that the command line's
    non-sweep overrides compose from ``configs/``; that initializes Hydra for the moment, so call it
    outside any ``initialize`` context or ``@hydra.main``.

    >>> for cell in expand(["experiment=kivi_smoke", "kv_bits=16,2"]):  # kivi_smoke: kv_bits 2,4,16
    ...     print(" ".join(cell))
    model=toy kv_bits=16 task=passkey experiment=kivi_smoke
    model=toy kv_bits=2 task=passkey experiment=kivi_smoke
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(overrides)
    parser = OverridesParser.create()
    if params is None:
        # the sweep overrides are the cells', not the head config's (Hydra composes it the same way)
        fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            head = compose("config", overrides=fixed, return_hydra_config=True)
            swept = [f"{k}={v}" for k, v in (head.hydra.sweeper.get("params") or {}).items()]
    else:
        swept = [f"{k}={v}" for k, v in params.items()]
    # without a max_batch_size the basic sweeper makes one batch of every cell
    (cells,) = BasicSweeper.split_arguments(parser.parse_overrides(swept + overrides), None)
    return cells


def count_cells(config: DictConfig) -> int | None:
    """Number of cells the basic sweeper will launch (``expand`` of the sweep's command line with
    the composed config's ``hydra.sweeper.params``); None for other sweepers."""
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None  # other sweepers (optuna, ...) decide the cells as they go
    return len(expand(config.hydra.overrides.task, config.hydra.sweeper.get("params") or {}))


def run_dir_of(task_cfg: DictConfig) -> Path:
    """The run directory ``qeval.run.run`` uses for this cell (same hash, same place)."""
    container = OmegaConf.to_container(task_cfg, resolve=True)
    return Path(task_cfg.results_dir) / "runs" / results.config_hash(container)


def classify(task_cfg: DictConfig, job_return: JobReturn, started: float) -> dict:
    """``done`` / ``skipped`` / ``failed`` for one finished cell, with the error if any."""
    if job_return.status == JobStatus.FAILED:
        err = job_return._return_value
        return {"status": "failed", "error": f"{type(err).__name__}: {err}", "run_dir": None}
    run_dir = run_dir_of(task_cfg)
    result = run_dir / "result.json"
    try:
        data = json.loads(result.read_text())
        mtime = result.stat().st_mtime
    except (OSError, ValueError):
        return {"status": "failed", "error": "no result.json was written", "run_dir": str(run_dir)}
    if data.get("status") != "ok":
        return {"status": "failed", "error": data.get("error"), "run_dir": str(run_dir)}
    # a result older than this cell's start was found, not computed
    status = "skipped" if mtime < started else "done"
    return {"status": status, "error": None, "run_dir": str(run_dir)}


def read_markers(sweep_dir: Path) -> list[dict]:
    out = []
    for p in sorted((sweep_dir / MARKER_DIR).glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue  # a marker is written atomically; an unreadable one is someone else's file
    return out


def summarize(sweep_dir: Path, total: int | None) -> dict:
    markers = read_markers(sweep_dir)
    counts = {s: sum(m["status"] == s for m in markers) for s in STATUSES}
    summary = {"sweep_dir": str(sweep_dir), "cells": total, **counts,
               "missing": None if total is None else max(0, total - len(markers)),
               "failed_cells": [{"job": m["job"], "overrides": m["overrides"], "error": m["error"]}
                                for m in markers if m["status"] == "failed"]}
    return summary


def summary_line(s: dict) -> str:
    line = (f"qeval sweep: {s['cells'] if s['cells'] is not None else '?'} cells: "
            f"done {s['done']}, skipped {s['skipped']}, failed {s['failed']}")
    if s.get("missing"):
        line += f", no report {s['missing']} (killed? rerun the sweep to redo them)"
    return line


def comparison(markers: list[dict]) -> str:
    """The headline numbers of every finished cell side by side: one line per cell (its swept
    overrides), one column per (task, metric)."""
    import pandas as pd

    # label a cell by the overrides that differ between cells, not the ones they all share
    values: dict[str, set] = {}
    for m in markers:
        for o in m["overrides"]:
            k, _, v = o.partition("=")
            values.setdefault(k, set()).add(v)
    varying = {k for k, vs in values.items() if len(vs) > 1}
    rows = []
    for m in markers:
        if m["status"] == "failed" or not m.get("run_dir"):
            continue
        label = " ".join(o for o in m["overrides"] if o.partition("=")[0] in varying) or "(defaults)"
        try:
            lines = (Path(m["run_dir"]) / "rows.jsonl").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            r = json.loads(line)
            if r.get("status") == "ok" and results.is_headline(r):
                rows.append({"cell": label, "job": m["job"], "task": r["task"], "metric": r["metric"],
                             "value": r["value"], **{k: r.get(k) for k in r if _is_knob(k)}})
    if not rows:
        return ""
    df = pd.DataFrame(rows)
    # what every cell shares, so the table says what it compares (a demo's quiet per-tensor KV too)
    shared = [f"{k}={df[k].iloc[0]}" for k in df.columns if _is_knob(k)
              and df[k].astype(str).nunique() == 1 and df[k].notna().all()]
    table = df.pivot_table(index=["job", "cell"], columns=["task", "metric"], values="value", aggfunc="first")
    table.index = table.index.droplevel("job")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        text = table.to_string(float_format=lambda x: f"{x:.3f}")
    return ("every cell: " + " ".join(shared) + "\n" if shared else "") + text


# the row columns that say how a cell ran (shown when every cell shares them)
KNOBS = ("model", "method", "w_bits", "a_bits", "kv_bits", "k_bits", "v_bits", "kv_semantics", "dtype",
         "device", "kv_backend")


def _is_knob(key: str) -> bool:
    return key in KNOBS or key.startswith("method.")


class SweepSummary(Callback):
    """Hydra callback: progress per finished cell and a done/skipped/failed summary per sweep."""

    def __init__(self) -> None:
        self._started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        total = count_cells(config)
        (sweep_dir / MARKER_DIR).mkdir(parents=True, exist_ok=True)
        # a reused sweep folder: an earlier sweep's markers would be counted as this one's cells
        stale = sorted((sweep_dir / MARKER_DIR).glob("*.json"))
        for marker in stale:
            marker.unlink(missing_ok=True)
        if stale:
            print(f"qeval sweep: {sweep_dir} held {len(stale)} cell markers of an earlier sweep; "
                  f"cleared (their rows stay in the results directory)", flush=True)
        results.write_atomic(sweep_dir / MARKER_DIR / "total", json.dumps(total))
        print(f"qeval sweep: {total if total is not None else '?'} cells -> {sweep_dir}", flush=True)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        self._started = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        job = int(config.hydra.job.num)
        cell = classify(job_return.cfg, job_return, self._started) | {
            "job": job, "overrides": list(job_return.overrides or []),
            "seconds": time.time() - self._started}
        results.write_atomic(sweep_dir / MARKER_DIR / f"{job:06d}.json", json.dumps(cell, default=str))
        try:
            total = json.loads((sweep_dir / MARKER_DIR / "total").read_text())
        except (OSError, ValueError):
            total = None
        finished = len(read_markers(sweep_dir))
        print(f"qeval sweep: cell {job} {cell['status']} ({' '.join(cell['overrides'])}) "
              f"[{finished}/{total if total is not None else '?'} finished]", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            total = json.loads((sweep_dir / MARKER_DIR / "total").read_text())
        except (OSError, ValueError):
            total = None
        s = summarize(sweep_dir, total)
        results.write_atomic(sweep_dir / "sweep_summary.json", json.dumps(s, indent=2))
        table = comparison(read_markers(sweep_dir))
        if table:
            print(table, flush=True)
        print(summary_line(s), flush=True)
        for cell in s["failed_cells"]:
            print(f"qeval sweep:   failed cell {cell['job']} ({' '.join(cell['overrides'])}): {cell['error']}",
                  flush=True)
        if s["failed"] or s["missing"]:
            # a sweep with a failed or missing cell did not do what it was asked: say so to the
            # shell and to a job scheduler (SystemExit passes through Hydra's error handling)
            raise SystemExit(1)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m qeval.sweep <sweep dir>  (the hydra.sweep.dir of a multirun)", file=sys.stderr)
        return 2
    sweep_dir = Path(argv[0])
    if not (sweep_dir / MARKER_DIR).is_dir():
        print(f"qeval.sweep: {sweep_dir} is not a qeval sweep directory (no {MARKER_DIR}/)", file=sys.stderr)
        return 2
    try:
        total = json.loads((sweep_dir / MARKER_DIR / "total").read_text())
    except (OSError, ValueError):
        total = None
    s = summarize(sweep_dir, total)
    print(summary_line(s).replace("no report", "not finished or killed"))
    for cell in s["failed_cells"]:
        print(f"  failed cell {cell['job']} ({' '.join(cell['overrides'])}): {cell['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
