"""A finished cell is checked, not trusted: result.json records its rows' count and checksum and
the code that wrote them; a mismatch is said and recomputed, other code is named (resume=strict
recomputes), and the report names an unreadable run and leaves it out."""

import json
import subprocess
import sys

import pytest

from qeval import results
from qeval.report.gather import gather

CELL = ["model=tiny-random", "task.passkey.lengths=[256]", "task.passkey.depths=[0.5]",
        "task.passkey.samples_per_cell=1"]


def write(tmp_path, rows=None):
    rows = rows or [{"task": "passkey", "metric": "accuracy", "value": 1.0, "status": "ok", "model": "m",
                     "method": "uniform", "w_bits": 16, "a_bits": 16, "kv_bits": 16}]
    run_dir = tmp_path / "runs" / "abc"
    results.write_run(run_dir, {"status": "ok"}, rows, "x: 1\n")
    return run_dir


def test_written_rows_read_back_and_a_changed_file_is_named(tmp_path):
    run_dir = write(tmp_path)
    assert results.read_finished(run_dir)[1] is None and results.read_status(run_dir) == "ok"
    rows = run_dir / "rows.jsonl"
    for damage in (lambda: rows.write_text(rows.read_text()[:-5]),                         # truncated
                   lambda: rows.write_text(rows.read_text().replace("1.0", "0.5")),        # edited
                   lambda: rows.unlink()):                                                  # deleted
        write(tmp_path)
        damage()
        result, problem = results.read_finished(run_dir)
        assert result["status"] == "ok" and "rows.jsonl" in problem
        assert results.read_status(run_dir) is None
        with pytest.raises(results.UnreadableRun, match="rows.jsonl"):
            results.read_rows(run_dir)


def test_the_report_names_an_unreadable_run_and_keeps_the_rest(tmp_path, capsys):
    good = write(tmp_path)
    bad = tmp_path / "runs" / "def"
    results.write_run(bad, {"status": "ok"}, [{"task": "passkey", "metric": "accuracy", "value": 0.5}], "")
    (bad / "rows.jsonl").write_text("{not json\n")
    df = gather(tmp_path)
    assert set(df["run_dir"]) == {str(good)}
    assert str(bad / "rows.jsonl") in capsys.readouterr().err


def qeval(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "qeval", *CELL, *args, f"results_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)


def test_a_damaged_cell_is_recomputed_and_other_code_is_named(tmp_path):
    assert qeval(tmp_path).returncode == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = run_dir / "rows.jsonl"
    n = len(rows.read_text().splitlines())
    assert n > 1

    rows.write_text(rows.read_text().splitlines()[0] + "\n")                  # truncated by hand
    p = qeval(tmp_path)
    assert p.returncode == 0 and "recomputing" in p.stderr and "rows.jsonl" in p.stderr, p.stderr[-2000:]
    assert len(rows.read_text().splitlines()) == n and results.read_finished(run_dir)[1] is None

    # written by other code (sealed as qeval seals it), not damaged: kept and named
    result = json.loads((run_dir / "result.json").read_text())
    (run_dir / "result.json").write_text(json.dumps(results.sealed(result | {"git_commit": "0ther"})))
    p = qeval(tmp_path)
    assert "finished by qeval at commit 0ther" in p.stderr and "kept" in p.stderr, p.stderr[-2000:]
    assert json.loads((run_dir / "result.json").read_text())["git_commit"] == "0ther"      # skipped
    p = qeval(tmp_path, "resume=strict")
    assert p.returncode == 0 and "resume=strict: recomputing" in p.stderr, p.stderr[-2000:]
    assert json.loads((run_dir / "result.json").read_text())["git_commit"] == results.git_commit()
