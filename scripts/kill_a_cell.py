"""Kill one cell of a local-launcher sweep mid-run, then rerun the sweep: nothing lost, nothing twice.

    python scripts/kill_a_cell.py                       # 3 cells (kv_bits=16,4,2) in a temporary dir
    python scripts/kill_a_cell.py --results /tmp/k --cells kv_bits=16,8,4,2

1. Starts ``python -m qeval -m hydra/launcher=local`` on the tiny random model (offline, CPU).
2. Waits until a cell holds its run's ``.computing`` lock (validated, loading or evaluating), and
   sends that process SIGKILL — what the OOM killer or a hard time limit does.
3. The sweep must end by itself with exit status 1, a summary, the killed cell as ``failed``
   (error ``killed: ...``) and every other cell done.
4. Reruns the same sweep: it must exit 0, redo exactly the killed cell and skip the others.
5. Checks the results directory: one run directory per cell, every one ``ok`` with rows matching
   its checksum, no duplicated row, no temporary file left anywhere.

Prints one JSON line with what it saw; exit status 0 when every check held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CELL = ["model=tiny-random", "method=uniform", "task=passkey", "device=cpu",
        "task.passkey.lengths=[480]", "task.passkey.depths=[0.25,0.75]", "task.passkey.samples_per_cell=8",
        "task.passkey.key_digits=3", "task.passkey.batch_size=1"]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "TRANSFORMERS_VERBOSITY": "error"}


def start_sweep(results: Path, name: str, cells: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qeval", "-m", "hydra/launcher=local", f"results_dir={results}",
           f"hydra.sweep.dir={results / 'sweeps' / name}", *CELL, *cells]
    log = open(results / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=results, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def computing_pid(results: Path) -> tuple[int, Path] | None:
    """(pid, run directory) of a run whose ``.computing`` lock is held right now, if any."""
    for lock in (results / "runs").glob("*/.computing"):
        with open(lock) as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                continue   # nobody computes this one
            except BlockingIOError:
                words = f.read().split()   # "pid <n> on <host>"
        if len(words) >= 2 and words[0] == "pid":
            return int(words[1]), lock.parent
    return None


def kill_one_cell(results: Path, sweep: subprocess.Popen, timeout: float) -> tuple[int, bool]:
    deadline = time.time() + timeout
    while time.time() < deadline and sweep.poll() is None:
        if held := computing_pid(results):
            pid, run_dir = held
            os.kill(pid, signal.SIGKILL)
            # mid-run: the cell had not finished (its result.json is written last)
            return pid, not (run_dir / "result.json").exists()
        time.sleep(0.05)
    raise SystemExit(f"no cell started computing within {timeout:.0f} s (sweep exit {sweep.poll()})")


def summary(results: Path, name: str) -> dict:
    return json.loads((results / "sweeps" / name / "sweep_summary.json").read_text())


def check_results(results: Path, n_cells: int) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from qeval import results as res
    problems = []
    runs = [d for d in (results / "runs").iterdir() if d.is_dir()]
    if len(runs) != n_cells:
        problems.append(f"{len(runs)} run directories for {n_cells} cells")
    seen = set()
    for d in runs:
        result, problem = res.read_finished(d)
        if problem or not result or result.get("status") != "ok":
            problems.append(f"{d.name}: {problem or (result or {}).get('status')}")
            continue
        for r in res.read_rows(d):
            key = (r["run_id"], r["task"], r["metric"], r.get("length"), r.get("depth"))
            if key in seen:
                problems.append(f"duplicate row {key}")
            seen.add(key)
    leftovers = [str(p) for p in results.rglob("*.tmp")]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=None, help="results directory (default: a new temporary one)")
    ap.add_argument("--cells", default="kv_bits=16,4,2", help="the swept override (default kv_bits=16,4,2)")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    results = (args.results or Path(tempfile.mkdtemp(prefix="qeval_kill_"))).resolve()
    results.mkdir(parents=True, exist_ok=True)
    n_cells = len(args.cells.partition("=")[2].split(","))

    first = start_sweep(results, "first", [args.cells])
    victim, mid_run = kill_one_cell(results, first, args.timeout)
    first_rc = first.wait(timeout=args.timeout)
    s1 = summary(results, "first")
    second = start_sweep(results, "rerun", [args.cells])
    second_rc = second.wait(timeout=args.timeout)
    s2 = summary(results, "rerun")

    killed = [c for c in s1["failed_cells"] if str(c["error"]).startswith("killed:")]
    checks = {
        "the cell was killed before it finished": mid_run,
        "first sweep exits 1 and summarises": first_rc == 1 and s1["cells"] == n_cells,
        "the killed cell is one failed row, the others done": (
            s1["failed"] == 1 and len(killed) == 1 and s1["done"] == n_cells - 1 and not s1["missing"]),
        "rerun exits 0, redoes only the killed cell": (
            second_rc == 0 and (s2["done"], s2["skipped"], s2["failed"]) == (1, n_cells - 1, 0)),
    }
    problems = [name for name, ok in checks.items() if not ok] + check_results(results, n_cells)
    print(json.dumps({"results": str(results), "killed_pid": victim, "first": {k: s1[k] for k in (
        "cells", "done", "skipped", "failed", "missing")}, "killed_error": killed[0]["error"] if killed else None,
        "rerun": {k: s2[k] for k in ("cells", "done", "skipped", "failed", "missing")},
        "problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
