"""SIGINT and SIGTERM end a run cleanly: one line on stderr (no traceback), exit 130 or 143, the
cell recorded as ``interrupted`` and computed again by the next run; a sweep stopped by either
stops its cells, records them and still writes its summary; and every sweep gets a folder of its
own, even two started at once."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qeval import results

CELL = ["model=tiny-random", "method=uniform", "task=passkey", "device=cpu",
        "task.passkey.lengths=[240]", "task.passkey.depths=[0.5]", "task.passkey.samples_per_cell=1",
        "task.passkey.key_digits=3", "task.passkey.batch_size=1"]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "TRANSFORMERS_VERBOSITY": "error"}
# long enough that no cell ends before its signal: thousands of passkey samples, each ~25 ms
SLOW = "task.passkey.samples_per_cell=5000"

# `python -m qeval` whose passkey task says it has started (a file) and then waits for the signal:
# the signal always lands mid-computation, however fast or slow the machine
BLOCKED_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qeval.tasks import TASKS
    started = Path(sys.argv[1])
    def blocked(handle, cfg):
        started.touch()
        time.sleep(300)
        raise AssertionError("no signal came")
    TASKS["passkey"] = blocked
    sys.argv = ["qeval", *sys.argv[2:]]
    from qeval.__main__ import entry
    entry()
""")


def wait_for(condition, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s")


def computing(results_dir: Path) -> list[Path]:
    """The run directories whose ``.computing`` lock is held right now."""
    held = []
    for lock in results_dir.glob("runs/*/.computing"):
        with open(lock) as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(lock.parent)
    return held


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines()]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_a_single_run_with_one_line_and_an_interrupted_row(tmp_path, signum, status):
    started = tmp_path / "started"
    p = subprocess.Popen([sys.executable, "-c", BLOCKED_RUN, str(started), *CELL, f"results_dir={tmp_path}"],
                         cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(started.exists, "the task starting")
    p.send_signal(signum)
    out, err = p.communicate(timeout=60)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert p.returncode == status, err[-3000:]
    assert "Traceback" not in err + out and len(err.strip().splitlines()) == 1, err[-3000:]
    assert err.startswith(f"qeval: interrupted by {signal.Signals(signum).name}: {run_dir} records the cell")
    (row,) = rows(run_dir)
    assert row["status"] == "interrupted" and row["error"] == f"interrupted: {signal.Signals(signum).name}"
    assert row["trust_remote_code"] is False and results.read_status(run_dir) == "interrupted"

    again = subprocess.run([sys.executable, "-m", "qeval", *CELL, f"results_dir={tmp_path}"], cwd=tmp_path,
                           env=ENV, capture_output=True, text=True, timeout=200)
    assert again.returncode == 0 and "qeval: ok:" in again.stdout, again.stderr[-2000:]
    assert {r["status"] for r in rows(run_dir)} == {"ok"} and results.read_status(run_dir) == "ok"


def sweep_command(results_dir: Path, launcher: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "qeval", "-m", f"hydra/launcher={launcher}", f"results_dir={results_dir}",
            f"hydra.sweep.dir={results_dir / 'sweep'}", *CELL[:-3], SLOW, "task.passkey.key_digits=3",
            "task.passkey.batch_size=1", *overrides]


def stop_and_summarise(tmp_path: Path, launcher: str, send, signum: int, n_running: int):
    """Start a sweep of two slow cells, wait until ``n_running`` of them compute, ``send`` the
    signal; returns (the process, its stdout, stderr, summary, the run directories computing)."""
    p = subprocess.Popen(sweep_command(tmp_path, launcher, "kv_bits=4,16"), cwd=tmp_path, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    running = wait_for(lambda: len(held := computing(tmp_path)) >= n_running and held, "the cells starting")
    send(p, signum)
    out, err = p.communicate(timeout=120)
    summary = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert summary["stopped_by"] == signal.Signals(signum).name, summary
    assert f"qeval sweep: stopped by {signal.Signals(signum).name}" in out, out[-3000:]
    assert p.returncode == 128 + signum and "Traceback" not in err + out, (p.returncode, err[-3000:])
    assert not computing(tmp_path), "no cell goes on computing after the sweep ended"
    return summary, running


def to_parent(p, signum):
    p.send_signal(signum)


def to_terminal_group(p, signum):   # what Ctrl-C in a terminal does: every process of the group
    os.killpg(p.pid, signum)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("send,signum", [(to_parent, signal.SIGTERM), (to_terminal_group, signal.SIGINT)],
                         ids=["SIGTERM to the parent", "Ctrl-C to the process group"])
def test_a_stopped_local_sweep_stops_its_cells_and_writes_its_summary(tmp_path, send, signum):
    summary, running = stop_and_summarise(tmp_path, "local", send, signum, n_running=2)
    assert (summary["cells"], summary["done"], summary["failed"], summary["missing"]) == (2, 0, 2, 0), summary
    assert all(c["error"].startswith("interrupted:") for c in summary["failed_cells"]), summary
    for run_dir in running:
        assert {r["status"] for r in rows(run_dir)} == {"interrupted"}
        assert results.read_status(run_dir) == "interrupted"


@pytest.mark.timeout(300)
def test_a_stopped_in_process_sweep_records_its_cell_and_runs_no_other(tmp_path):
    summary, (run_dir,) = stop_and_summarise(tmp_path, "basic", to_parent, signal.SIGINT, n_running=1)
    assert (summary["cells"], summary["done"], summary["failed"], summary["missing"]) == (2, 0, 1, 1), summary
    assert summary["failed_cells"][0]["error"] == "interrupted: SIGINT"
    assert results.read_status(run_dir) == "interrupted"
    assert len(list((tmp_path / "runs").iterdir())) == 1, "the second cell never started"


@pytest.mark.timeout(300)
def test_two_sweeps_started_at_once_get_a_folder_each(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "qeval", "-m", "hydra/launcher=basic", f"results_dir={tmp_path}",
                               *CELL, f"kv_bits={bits}"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for bits in (4, 16)]
    outs = [p.communicate(timeout=250)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = sorted(tmp_path.glob("hydra/multirun/*/*"))
    assert len(folders) == 2, folders
    for folder in folders:
        s = json.loads((folder / "sweep_summary.json").read_text())
        assert (s["cells"], s["done"], s["failed"], s["missing"]) == (1, 1, 0, 0), s


@pytest.mark.timeout(120)
def test_a_sweep_folder_held_by_a_running_sweep_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / ".qeval_cells").mkdir()
    marker = folder / ".qeval_cells" / "000000.json"
    marker.write_text('{"job": 0, "status": "done", "overrides": [], "error": null}')
    with open(folder / ".qeval_sweep.lock", "a+") as held:   # as a running sweep holds it
        held.write("pid 1 on elsewhere\n")
        held.flush()
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        p = subprocess.run(sweep_command(tmp_path, "basic", "kv_bits=4,16"), cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=100)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [
        (f"qeval: error: the sweep folder {folder} is in use by a running sweep (pid 1 on elsewhere); "
         f"give this one its own hydra.sweep.dir=...")]
    assert marker.exists(), "the running sweep's markers are left alone"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_command_is_checked_is_one_line(signum, tmp_path, monkeypatch, capsys):
    # validation imports torch and may read a tokenizer (seconds): stopped then, nothing is written
    import qeval.__main__ as entry_point
    from qeval.sweep import signals

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(signals, "received", None)

    def check_stopped(flags, overrides):
        os.kill(os.getpid(), signum)
        time.sleep(10)   # the signal raises here, long before this ends
        raise AssertionError("the signal did not stop the check")

    monkeypatch.setattr(entry_point, "check", check_stopped)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["qeval", "task=toy_mc"])
    try:
        with pytest.raises(SystemExit) as exit_:
            entry_point.entry()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 128 + signum
    assert len(err) == 1 and "before the run started; nothing was written" in err[0], err
    assert list(tmp_path.iterdir()) == []
