"""A run's files are checked before they are trusted: each kind of damage to result.json,
rows.jsonl, config.yaml or a saved calibration result is named in one log line and the cell (or
the calibration) is computed again with the same rows; a directory or a FIFO in a file's place is
named (a FIFO never waited on) and moved aside; a full disk damages nothing already written and
ends a single run with one line."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from qeval import results
from qeval.calibration import store
from qeval.run import run
from qeval.sweep import run_dir_of
from qeval.validate import CONFIG_DIR

# one tiny cell (as tests/test_sweeps.py): 1 passkey sample on the random tiny model
CELL = ["model=tiny-random", "method=uniform", "task=passkey", "device=cpu",
        "task.passkey.lengths=[240]", "task.passkey.depths=[0.5]", "task.passkey.samples_per_cell=1",
        "task.passkey.key_digits=3", "task.passkey.batch_size=1"]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
VOLATILE = ("seconds", "tokens_per_s", "peak_memory_bytes", "calibration_seconds", "config")   # config: results_dir


def config(results_dir: Path, *extra: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[*CELL, f"results_dir={results_dir}", *extra])


def measured(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A results directory holding the cell, finished; (its run directory, its rows)."""
    root = tmp_path_factory.mktemp("finished")
    result = run(config(root))
    assert result["status"] == "ok"
    return Path(result["run_dir"]), results.read_rows(Path(result["run_dir"]))


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def directory(path: Path) -> None:
    path.unlink()
    (path / "inside").mkdir(parents=True)   # not empty: os.replace could never replace it


def edit_result(change):
    def damage(path: Path) -> None:
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return damage


def pre_checksum(run_dir: Path) -> None:
    """result.json as qeval wrote it before checksums, beside an empty rows.jsonl."""
    result = json.loads((run_dir / "result.json").read_text())
    old = {k: v for k, v in result.items() if k not in ("sha256", "rows_sha256", "rows_count", "config_sha256")}
    (run_dir / "result.json").write_text(json.dumps(old))
    (run_dir / "rows.jsonl").write_text("")


# (file, damage, what the one log line says)
DAMAGE = [
    ("result.json", lambda p: p.write_text("[]"), "result.json holds a JSON list, not an object"),
    ("result.json", lambda p: p.write_text('"ok"'), "result.json holds a JSON str, not an object"),
    ("result.json", lambda p: p.write_text(p.read_text()[:40]), "result.json is not JSON"),
    ("result.json", lambda p: p.write_bytes(b"\xff\xfe" + p.read_bytes()[2:]), "result.json is not JSON"),
    ("result.json", lambda p: p.write_text(""), "result.json is not JSON"),
    ("result.json", edit_result(lambda r: r | {"rows_count": 1}), "result.json does not match the checksum"),
    ("result.json", directory, "result.json is a directory, not a file"),
    ("result.json", fifo, "result.json is a FIFO, not a file"),
    ("rows.jsonl", lambda p: p.write_text(""), "rows.jsonl does not hold the"),
    ("rows.jsonl", directory, "rows.jsonl is a directory, not a file"),
    ("rows.jsonl", fifo, "rows.jsonl is a FIFO, not a file"),
    ("config.yaml", lambda p: p.write_text(p.read_text().replace("seed: 0", "seed: 1")),
     "config.yaml is not the config result.json recorded"),
    ("config.yaml", lambda p: p.write_text(p.read_text()[:100]), "config.yaml is not the config result.json recorded"),
    ("config.yaml", lambda p: p.unlink(), "config.yaml is missing"),
    ("config.yaml", directory, "config.yaml is a directory, not a file"),
    ("config.yaml", fifo, "config.yaml is a FIFO, not a file"),
    (".", pre_checksum, "rows.jsonl holds no rows (written before checksums"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,damage,said", DAMAGE, ids=[f"{d[0]}: {d[2]}" for d in DAMAGE])
def test_a_damaged_run_file_is_named_once_and_the_cell_is_redone(finished, tmp_path, caplog, name, damage, said):
    template, rows = finished
    run_dir = tmp_path / "runs" / template.name
    shutil.copytree(template, run_dir)
    damage(run_dir / name)
    caplog.set_level(logging.INFO)
    result = run(config(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and said in warnings[0] and "recomputing" in warnings[0], warnings
    assert result["status"] == "ok", "the cell was computed again, not skipped"
    assert results.read_finished(run_dir) == (results.read_finished(run_dir)[0], None)
    assert measured(results.read_rows(run_dir)) == measured(rows)
    if "directory" in said:   # moved aside, named, never deleted
        (aside,) = run_dir.glob(f"{name}.moved-aside-*")
        assert (aside / "inside").is_dir()
    assert not results.temporaries(run_dir)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("in_the_way", [".computing", ".lock", "rows.jsonl"])
def test_a_directory_where_a_lock_or_file_goes_is_moved_aside_not_crashed_on(tmp_path, in_the_way):
    cfg = config(tmp_path)
    run_dir = run_dir_of(cfg)
    (run_dir / in_the_way / "inside").mkdir(parents=True)
    assert run(cfg)["status"] == "ok"
    assert results.read_status(run_dir) == "ok"
    assert list(run_dir.glob(f"{in_the_way}.moved-aside-*"))


@pytest.mark.timeout(120)
def test_a_file_where_the_run_directory_goes_is_moved_aside(tmp_path):
    cfg = config(tmp_path)
    run_dir = run_dir_of(cfg)
    run_dir.parent.mkdir(parents=True)
    run_dir.write_text("not a directory")
    assert run(cfg)["status"] == "ok" and results.read_status(run_dir) == "ok"
    assert list(run_dir.parent.glob(f"{run_dir.name}.moved-aside-*"))


# ---------------------------------------------------------------------------- a full disk
def full_disk_at(monkeypatch, names: tuple[str, ...]):
    """fsync raises ENOSPC for a temporary of one of ``names``, as a full disk would."""
    from qeval.files import atomic
    sync = os.fsync

    def fsync(fd):
        if any(f".{n}." in os.readlink(f"/proc/self/fd/{fd}") for n in names):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        sync(fd)
    monkeypatch.setattr(atomic.os, "fsync", fsync)


def test_a_full_disk_changes_no_file_already_written_and_leaves_no_temporary(tmp_path, monkeypatch):
    rows = [{"task": "t", "metric": "m", "value": 1.0, "status": "ok"}]
    run_dir = tmp_path / "runs" / "abc"
    results.write_run(run_dir, {"status": "ok"}, rows, "x: 1\n")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for name in ("config.yaml", "rows.jsonl", "result.json"):
        with monkeypatch.context() as m:
            full_disk_at(m, (name,))
            with pytest.raises(results.DiskFull, match=f"No space left on device writing .*{name}"):
                results.write_run(run_dir, {"status": "ok"}, rows * 3, "x: 2\n")
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
        assert not results.temporaries(run_dir) and results.read_status(run_dir) == "ok"


@pytest.mark.timeout(120)
def test_a_full_disk_at_the_final_write_keeps_a_failed_row(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    written = []
    real = results.write_run

    def rows_do_not_fit(run_dir, result, rows, config_yaml):
        if result["status"] == "ok":
            raise results.DiskFull(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir / "rows.jsonl"))
        written.append(result["status"])
        real(run_dir, result, rows, config_yaml)
    monkeypatch.setattr(results, "write_run", rows_do_not_fit)
    with pytest.raises(results.DiskFull) as e:
        run(cfg)
    assert "rows were not saved; a failed row records the cell" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(results, "write_run", real)
    assert written == ["failed"] and results.read_status(run_dir_of(cfg)) == "failed"
    assert run(cfg)["status"] == "ok", "the failed cell is computed again"


FULL_DISK_RUN = textwrap.dedent("""
    import errno, os, sys
    from qeval.files import atomic
    sync = os.fsync
    def fsync(fd):   # every write of the cell's rows finds the disk full
        if ".rows.jsonl." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        sync(fd)
    atomic.os.fsync = fsync
    sys.argv = ["qeval", *sys.argv[1:]]
    from qeval.__main__ import entry
    entry()
""")


@pytest.mark.timeout(300)
def test_a_single_run_on_a_full_disk_ends_with_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-c", FULL_DISK_RUN, *CELL, f"results_dir={tmp_path}"], cwd=tmp_path,
                       env=ENV, capture_output=True, text=True, timeout=250)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("qeval: error: No space left on device writing ") and "rows.jsonl" in lines[0]
    assert "nothing was recorded" in lines[0]
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.glob("runs/*/result.json"))


# ---------------------------------------------------------------------------- saved calibration
IDENT = {"model": {"name": "m", "dtype": "float32"}, "method": {"w_bits": 3}, "calibration": {"n": 16}}


def saved_calibration(where: Path) -> None:
    store.write(where, {"linears": {"l": {"w": torch.arange(64.0)}}},
                {"identity": IDENT, "samples": 1, "tokens": 8, "seconds": 0.0})


def rewrite_meta(change):
    def damage(where: Path) -> None:
        meta = json.loads((where / store.META).read_text())
        (where / store.META).write_text(json.dumps(change(meta)))
    return damage


# (damage, why it is not used)
CALIBRATION_DAMAGE = [
    (lambda w: (w / store.RESULT).write_bytes((w / store.RESULT).read_bytes()[:100]), "(truncated or replaced)"),
    (lambda w: (w / store.RESULT).write_bytes((w / store.RESULT).read_bytes()[::-1]), "does not match the checksum"),
    (lambda w: (w / store.RESULT).unlink(), "result.pt is missing"),
    (lambda w: fifo(w / store.RESULT), "result.pt is a FIFO, not a file"),
    (lambda w: (w / store.META).write_text("{"), "calibration.json is not JSON"),
    (lambda w: (w / store.META).write_text("[]"), "calibration.json holds a JSON list"),
    (lambda w: fifo(w / store.META), "calibration.json is a FIFO, not a file"),
    (rewrite_meta(lambda m: m | {"tokens": 9}), "calibration.json does not match the checksum"),
    (rewrite_meta(lambda m: store.results.sealed(m | {"identity": IDENT | {"method": {"w_bits": 4}}})),
     "computed for another model, method or data"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage,why", CALIBRATION_DAMAGE, ids=[c[1] for c in CALIBRATION_DAMAGE])
def test_a_damaged_saved_calibration_is_not_used_and_says_why(tmp_path, damage, why):
    saved_calibration(tmp_path)
    result, meta = store.read(tmp_path, IDENT)
    assert torch.equal(result["linears"]["l"]["w"], torch.arange(64.0)) and meta["tokens"] == 8
    damage(tmp_path)
    with pytest.raises(store.Unusable, match=why.replace("(", r"\(").replace(")", r"\)")):
        store.read(tmp_path, IDENT)
    assert store.unusable(tmp_path / "nothing", IDENT) == store.NOT_SAVED


@pytest.mark.timeout(300)
def test_a_damaged_saved_calibration_is_computed_again_with_one_line(tmp_path, caplog):
    common = ["model=toy", "method=gptq", "w_bits=3", "calibration.n_samples=16", "task=quant_error"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*common, f"results_dir={tmp_path}"])
        again = compose("config", overrides=[*common, f"results_dir={tmp_path}", "force=true"])
    first = results.read_rows(Path(run(cfg)["run_dir"]))
    (where,) = (tmp_path / "calibration").iterdir()
    pt = where / store.RESULT
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])   # a copy cut short
    caplog.set_level(logging.INFO)
    second = results.read_rows(Path(run(again)["run_dir"]))
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "is not used" in said[0] and "calibrating again" in said[0], said
    assert {r["calibration_reused"] for r in second} == {False}
    assert [(r.get("layer"), r["metric"], r["value"]) for r in second] == \
        [(r.get("layer"), r["metric"], r["value"]) for r in first]
    assert store.read(where, json.loads((where / store.META).read_text())["identity"])


def test_a_reader_does_not_wait_forever_on_a_held_lock(finished, tmp_path, monkeypatch):
    # a writer holds <run>/.lock only while it renames its files into place; one that never lets
    # go (stuck or hostile) is named after READ_WAIT_S, and neither a rerun nor the report hangs
    import fcntl
    run_dir = tmp_path / finished[0].name
    shutil.copytree(finished[0], run_dir)
    monkeypatch.setattr(results, "READ_WAIT_S", 0.2)
    with open(run_dir / ".lock", "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        result, problem = results.read_finished(run_dir)
    assert result is None and "held by a writer for more than" in problem
    assert results.read_finished(run_dir)[0]["status"] == "ok"   # released: read as before
