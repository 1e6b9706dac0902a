"""Sweeps survive failure and resume: real subprocess sweeps through ``hydra/launcher=local``
(submitit), a validation error in one cell of an in-process sweep, and two processes writing into
one results directory at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qeval.report.gather import gather

# one tiny cell: 1 passkey sample of ~240 tokens on the random tiny model, about a second
CELL = ["model=tiny-random", "method=uniform", "task=passkey", "device=cpu",
        "task.passkey.lengths=[240]", "task.passkey.depths=[0.5]", "task.passkey.samples_per_cell=1",
        "task.passkey.key_digits=3", "task.passkey.batch_size=1"]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "TRANSFORMERS_VERBOSITY": "error"}


def cell_with(*overrides: str) -> list[str]:
    """CELL with ``overrides`` in place of its own values (a key given twice is refused)."""
    keys = {o.partition("=")[0] for o in overrides}
    return [c for c in CELL if c.partition("=")[0] not in keys] + list(overrides)


def sweep(results: Path, name: str, *overrides: str, launcher: str = "local") -> dict:
    """Run one multirun sweep in a fresh process; returns its sweep_summary.json."""
    sweep_dir = results / "sweeps" / name
    cmd = [sys.executable, "-m", "qeval", "-m", f"hydra/launcher={launcher}", f"results_dir={results}",
           f"hydra.sweep.dir={sweep_dir}", *cell_with(*overrides)]
    p = subprocess.run(cmd, cwd=results, env=ENV, capture_output=True, text=True, timeout=500)
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    # exit status 1 exactly when a cell failed or is missing
    expected = 1 if summary["failed"] or summary["missing"] else 0
    assert p.returncode == expected, f"sweep {name} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "qeval sweep:" in p.stdout and f"done {summary['done']}" in p.stdout, p.stdout[-2000:]
    return summary


def run_dirs(results: Path) -> dict[int, Path]:
    """kv_bits -> run directory, read from each run's own config (never from the directory name)."""
    import yaml
    out = {}
    for d in (results / "runs").iterdir():
        out[yaml.safe_load((d / "config.yaml").read_text())["kv_bits"]] = d
    return out


def mtimes(dirs: dict[int, Path]) -> dict[int, float]:
    return {b: (d / "result.json").stat().st_mtime_ns for b, d in dirs.items()}


@pytest.mark.timeout(900)
def test_local_sweep_resumes_and_recomputes_exactly_the_missing_cell(tmp_path, capsys):
    bits = "kv_bits=2,4,8,16"
    first = sweep(tmp_path, "first", bits)
    assert (first["cells"], first["done"], first["skipped"], first["failed"]) == (4, 4, 0, 0), first
    dirs = run_dirs(tmp_path)
    assert sorted(dirs) == [2, 4, 8, 16]
    for d in dirs.values():
        result = json.loads((d / "result.json").read_text())
        assert result["status"] == "ok"
        assert [r["status"] for r in result["rows"]] and all(r["status"] == "ok" for r in result["rows"])
        assert (d / "rows.jsonl").read_text().count("\n") == len(result["rows"])
    before = mtimes(dirs)
    from qeval.sweep.__main__ import main as sweep_status
    assert sweep_status([str(tmp_path / "sweeps" / "first")]) == 0
    assert "4 cells: done 4, skipped 0, failed 0" in capsys.readouterr().out

    # in-process (one interpreter start instead of five): skipping is the run's own check
    again = sweep(tmp_path, "again", bits, launcher="basic")
    assert (again["done"], again["skipped"], again["failed"]) == (0, 4, 0), again
    assert mtimes(run_dirs(tmp_path)) == before, "a finished cell was rewritten"

    import shutil
    shutil.rmtree(dirs[4])
    # in-process this time (one interpreter start instead of five): resume is the run's own check
    third = sweep(tmp_path, "after_delete", bits, launcher="basic")
    assert (third["done"], third["skipped"], third["failed"]) == (1, 3, 0), third
    after = mtimes(run_dirs(tmp_path))
    assert {b for b in after if after[b] != before[b]} == {4}, "exactly the deleted cell is recomputed"
    assert len(gather(tmp_path)) == 4 * 2  # per (length, depth) cell + overall, per run


@pytest.mark.timeout(600)
def test_local_sweep_a_failing_cell_leaves_a_failed_row_and_the_others_finish(tmp_path):
    # batch_size=0 is refused by the passkey task's own check: in a sweep, a failed row for that cell
    s = sweep(tmp_path, "fail", "kv_bits=4", "task.passkey.batch_size=1,0")
    assert (s["cells"], s["done"], s["failed"]) == (2, 1, 1), s
    assert "task.passkey.batch_size=0" in s["failed_cells"][0]["overrides"]
    df = gather(tmp_path)
    failed = df[df["status"] == "failed"]
    assert len(failed) == 1 and failed["error"].iloc[0], "the failed cell writes one row with its error"
    ok = df[df["status"] == "ok"]
    assert len(ok) == 2 and ok["value"].notna().all()
    # the failed cell is redone on the next run of the sweep (and fails again), the ok one skipped
    s2 = sweep(tmp_path, "fail_again", "kv_bits=4", "task.passkey.batch_size=1,0", launcher="basic")
    assert (s2["done"], s2["skipped"], s2["failed"]) == (0, 1, 1), s2


@pytest.mark.timeout(300)
def test_config_error_in_one_cell_does_not_stop_the_sweep(tmp_path):
    # w_group_size=100 does not divide the tiny model's width 128: a validation error for that
    # cell only; in a single run it is a one-line error, in a sweep a failed row
    s = sweep(tmp_path, "config_error", "method=group", "w_bits=4", "w_group_size=100,128",
              launcher="basic")
    assert (s["cells"], s["done"], s["failed"]) == (2, 1, 1), s
    assert "w_group_size=100" in s["failed_cells"][0]["error"]
    df = gather(tmp_path)
    assert set(df["status"]) == {"ok", "failed"}
    assert df.loc[df["status"] == "failed", "error"].str.startswith("ConfigError").all()


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from qeval import results
    root, who, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for i in range(n):
        # half the run ids are shared with the other writer (the same cell run twice at once)
        run_id = f"shared{i:03d}" if i % 2 else f"{who}{i:03d}"
        rows = [{"run_id": run_id, "writer": who, "metric": "m", "value": float(j), "n": 1,
                 "status": "ok", "model": "x", "method": "uniform", "w_bits": 16, "a_bits": 16,
                 "kv_bits": 16, "task": "t"} for j in range(5)]
        results.write_run(root / "runs" / run_id, {"run_id": run_id, "status": "ok", "rows": rows},
                          rows, "x: 1\\n")
""")


@pytest.mark.timeout(120)
def test_two_processes_writing_one_results_dir_lose_no_rows(tmp_path):
    n = 60
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), who, str(n)], env=ENV)
             for who in ("a", "b")]
    assert [p.wait(timeout=100) for p in procs] == [0, 0]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == n // 2 * 2 + n // 2  # a's own, b's own, and the shared ids once each
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"
    for d in runs:  # every file whole and parseable, never a half-written mix
        result = json.loads((d / "result.json").read_text())
        rows = [json.loads(line) for line in (d / "rows.jsonl").read_text().splitlines()]
        assert len(rows) == 5 and {r["run_id"] for r in rows} == {d.name}
        assert result["run_id"] == d.name
    assert len(gather(tmp_path)) == len(runs) * 5


@pytest.mark.timeout(120)
def test_out_of_memory_in_a_task_is_a_failed_row(tmp_path, monkeypatch):
    import torch
    from hydra import compose, initialize_config_dir

    from qeval.run import run
    from qeval.tasks import TASKS
    from qeval.validate import CONFIG_DIR

    def out_of_memory(handle, cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setitem(TASKS, "passkey", out_of_memory)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*CELL, f"results_dir={tmp_path}"])
    result = run(cfg)
    assert result["status"] == "failed" and result["error"].startswith("OutOfMemoryError")
    df = gather(tmp_path)
    assert len(df) == 1 and df["status"].iloc[0] == "failed" and "80.00 GiB" in df["error"].iloc[0]
    assert (Path(result["run_dir"]) / "result.json").stat().st_mode & 0o044, "rows readable by others"


@pytest.mark.timeout(120)
def test_force_recomputes_a_finished_cell_under_the_same_identity(tmp_path):
    from hydra import compose, initialize_config_dir

    from qeval.run import run
    from qeval.validate import CONFIG_DIR
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*CELL, f"results_dir={tmp_path}"])
        forced = compose("config", overrides=[*CELL, f"results_dir={tmp_path}", "force=true"])
    first = run(cfg)
    stamp = (Path(first["run_dir"]) / "result.json").stat().st_mtime_ns
    assert run(cfg)["status"] == "skipped"
    again = run(forced)
    assert again["status"] == "ok" and again["run_dir"] == first["run_dir"], "force is not part of the identity"
    assert (Path(first["run_dir"]) / "result.json").stat().st_mtime_ns > stamp


@pytest.mark.timeout(300)
def test_a_reused_sweep_folder_counts_only_this_sweeps_cells(tmp_path):
    first = sweep(tmp_path, "reused", "kv_bits=4,16", launcher="basic")
    assert (first["cells"], first["done"]) == (2, 2), first
    # temporaries a killed sweep left in its folder are cleared with its markers
    leftovers = [tmp_path / "sweeps" / "reused" / ".qeval_cells" / ".000001.json.dead.tmp",
                 tmp_path / "sweeps" / "reused" / ".sweep_summary.json.dead.tmp"]
    for f in leftovers:
        f.write_text("{")
    again = sweep(tmp_path, "reused", "kv_bits=8", launcher="basic")
    assert (again["cells"], again["done"], again["skipped"], again["missing"]) == (1, 1, 0, 0), again
    assert not any(f.exists() for f in leftovers)


@pytest.mark.timeout(600)
def test_two_processes_asking_for_one_cell_compute_it_once(tmp_path):
    # two single runs of the same cell at once (two sweeps sharing a results directory): the
    # second waits on the cell's lock, then finds the first one's result
    cmd = [sys.executable, "-m", "qeval", f"results_dir={tmp_path}", *cell_with("task.passkey.samples_per_cell=4")]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("qeval: ok:" in o for o in outs) == 1, outs
    assert sum("already done" in o for o in outs) == 1, outs
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len(gather(tmp_path)) == len((run_dir / "rows.jsonl").read_text().splitlines())


@pytest.mark.timeout(300)
def test_temporaries_of_a_killed_writer_are_removed_when_the_cell_is_computed(tmp_path):
    from hydra import compose, initialize_config_dir

    from qeval.run import run
    from qeval.validate import CONFIG_DIR
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*CELL, f"results_dir={tmp_path}"])
    from qeval.sweep import run_dir_of
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True)
    # what write_atomic leaves when its process dies between writing and renaming
    leftover = run_dir / ".rows.jsonl.k1ll3d.tmp"
    leftover.write_text('{"half": ')
    assert run(cfg)["status"] == "ok"
    assert not leftover.exists() and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.timeout(900)
def test_a_killed_cell_is_a_failed_row_and_the_rerun_completes_every_cell(tmp_path):
    # the README's demonstration: SIGKILL one cell of a local-launcher sweep mid-run; the sweep
    # summarises and exits 1, the rerun redoes exactly that cell; no row lost, none twice
    script = Path(__file__).resolve().parents[1] / "scripts" / "kill_a_cell.py"
    p = subprocess.run([sys.executable, str(script), "--results", str(tmp_path), "--cells", "kv_bits=16,2"],
                       env=ENV, capture_output=True, text=True, timeout=800)
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 0 and not report["problems"], (report, p.stderr[-2000:])
    assert report["first"]["failed"] == 1 and report["killed_error"].startswith("killed:")
    assert (report["rerun"]["done"], report["rerun"]["skipped"]) == (1, 1)
