"""The command line end to end: one run writes a complete row; multirun works with the basic
launcher; a rerun skips what is done."""

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROW_FIELDS = [
    "model", "method", "method.kv_granularity", "w_bits", "a_bits", "kv_bits", "k_bits", "v_bits",
    "w_group_size", "a_group_size", "kv_group_size", "kv_semantics", "task", "split", "metric", "value", "n",
    "seconds", "tokens_per_s", "peak_memory_bytes", "kv_bytes_held", "kv_bytes_packed", "config_hash",
    "git_commit", "version.torch", "version.transformers", "device", "status",
]


def qeval(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qeval", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def rows_in(results: Path) -> list[dict]:
    return [json.loads(l) for f in sorted(results.glob("runs/*/rows.jsonl")) for l in f.read_text().splitlines()]


def test_design_card_command_writes_a_complete_row(tmp_path):
    p = qeval("model=tiny-random", "method=uniform", "kv_bits=4", "task=passkey", f"results_dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-2000:]
    run_dirs = list(tmp_path.glob("runs/*"))
    assert len(run_dirs) == 1
    assert {f.name for f in run_dirs[0].iterdir()} >= {"result.json", "rows.jsonl", "config.yaml"}
    result = json.loads((run_dirs[0] / "result.json").read_text())
    assert result["status"] == "ok"
    rows = rows_in(tmp_path)
    overall = [r for r in rows if r.get("length") is None]
    cells = [r for r in rows if r.get("length") is not None]
    assert len(overall) == 1 and len(cells) == 15  # 3 lengths x 5 depths
    row = overall[0]
    missing = [f for f in ROW_FIELDS if f not in row or row[f] is None and f not in ("a_group_size", "kv_group_size")]
    assert not missing, missing
    assert row["kv_bits"] == 4 and row["task"] == "passkey" and row["metric"] == "accuracy"
    assert row["n"] == 30 and 0.0 <= row["value"] <= 1.0
    # fake quantization holds full-precision tensors; the packed layout is reported beside it
    assert row["kv_bytes_held"] > 4 * row["kv_bytes_packed"] > 0
    assert "accuracy" in p.stdout and "passkey" in p.stdout  # the compact table


def test_multirun_with_the_basic_launcher_and_resume(tmp_path):
    args = ["-m", "model=tiny-random", "kv_bits=16,4", "task.passkey.lengths=[240]",
            "task.passkey.depths=[0.5]", f"results_dir={tmp_path}"]
    p = qeval(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = rows_in(tmp_path)
    assert sorted({r["kv_bits"] for r in rows}) == [4, 16]
    assert len({r["config_hash"] for r in rows}) == 2
    stamps = {f: f.stat().st_mtime_ns for f in tmp_path.glob("runs/*/result.json")}
    again = qeval(*args)
    assert again.returncode == 0
    assert again.stdout.count("already done") == 2
    assert stamps == {f: f.stat().st_mtime_ns for f in tmp_path.glob("runs/*/result.json")}


def test_no_arguments_runs_the_demo_comparison(tmp_path):
    """The Quickstart's default job: toy model, full precision vs 4- and 2-bit KV, side by side."""
    p = qeval(cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = rows_in(tmp_path / "results")
    assert {r["model"] for r in rows} == {"toy"} and sorted({r["kv_bits"] for r in rows}) == [2, 4, 16]
    assert {r["task"] for r in rows} == {"passkey", "toy_arith", "toy_mc"}
    lines = p.stdout.splitlines()
    table = lines[lines.index(next(l for l in lines if l.startswith("task "))):]
    assert any(l.startswith("kv_bits=16") for l in table) and any(l.startswith("kv_bits=2") for l in table)
    assert "3 cells: done 3" in p.stdout
    headline = {(r["kv_bits"], r["task"]): r["value"] for r in rows if r.get("length") is None
                and r.get("operation") is None and r.get("question_type") is None}
    # what the demo is for: 2-bit KV costs passkey accuracy that 4-bit keeps
    assert headline[(2, "passkey")] < headline[(16, "passkey")] - 0.3


def test_hydra_flags_keep_their_arguments(tmp_path):
    """qeval's own overrides (results_dir) never split Hydra's flags from their values."""
    p = qeval("model=toy", "--cfg", "job", cwd=tmp_path)
    assert p.returncode == 0 and "name: toy" in p.stdout, p.stderr[-2000:]
    p = qeval("--help", cwd=tmp_path)
    assert p.returncode == 0 and "Configuration groups" in p.stdout, p.stderr[-2000:]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("line", [
    ["-m", "kv_bits=16,2", "method=uniform,group"],
    ["kv_bits=16,2", "-m", "method=uniform,group"],
    ["kv_bits=16,2", "method=uniform,group", "-m"],
    ["kv_bits=16,2", "--multirun", "method=uniform,group"],
])
def test_a_sweep_line_with_flags_anywhere_shows_every_cell(line, tmp_path):
    """Hydra takes overrides as one run of positionals; qeval puts its flags first, so -m may sit
    anywhere, and --cfg job on a sweep prints each cell's config (Hydra refuses both together)."""
    p = qeval(*line, "--cfg", "job", "task.passkey.lengths=[240]", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    heads = [l for l in p.stdout.splitlines() if l.startswith("# cell ")]
    assert len(heads) == 4 and "kv_bits=2 method=group" in heads[-1], p.stdout[:2000]
    assert not (tmp_path / "results").exists()
    for flag in (["--help"], ["--info", "defaults"]):
        p = qeval(*line, *flag, cwd=tmp_path)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "results").exists()


def test_the_sweep_line_runs_with_minus_m_in_the_middle(tmp_path):
    p = qeval("kv_bits=16,4", "-m", "task.passkey.lengths=[240]", "task.passkey.depths=[0.5]", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "qeval sweep: 2 cells: done 2, skipped 0, failed 0" in p.stdout
    assert sorted({r["kv_bits"] for r in rows_in(tmp_path / "results")}) == [4, 16]


HEAVY = ("torch", "transformers", "lm_eval", "pandas", "triton", "datasets")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["method=unifrom"], ["kv_bit=2"],
                                  ["-m", "kv_bits=2,4", "--cfg", "job"]])
def test_the_cli_answers_without_heavy_imports(args, tmp_path):
    """--help, --version, a refused override and --cfg import none of the libraries that take
    seconds (read from python -X importtime, which lists every module imported)."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "qeval", *args], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    imported = {line.rpartition("|")[2].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert imported, p.stderr[-2000:]
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert p.returncode == (2 if "=" in args[0] and "-m" not in args else 0), p.stderr[-2000:]


def test_version_names_qeval_and_the_libraries_behind_its_numbers():
    from importlib import metadata
    p = qeval("--version")
    assert p.returncode == 0
    line = p.stdout.strip()
    assert line.startswith(f"qeval {metadata.version('qeval')} ")
    for lib in ("torch", "transformers", "lm-eval", "triton"):
        assert f"{lib} {metadata.version(lib)}" in line, line


def test_a_refused_run_leaves_no_folder(tmp_path):
    """Found only with the model's architecture (BLOOM runs its own attention), still before Hydra
    writes its run folder."""
    p = qeval("model=tiny-random", "model.random_config.model_type=bloom", "kv_bits=4",
              "kv_semantics=simulated", cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().count("\n") == 0 and "kv_semantics=simulated" in p.stderr
    assert not list(tmp_path.iterdir()), list(tmp_path.rglob("*"))


def test_a_launcher_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    if shutil.which("sbatch", path=env["PATH"]):
        pytest.skip("sbatch is installed here")
    p = subprocess.run([sys.executable, "-m", "qeval", "experiment=kivi_smoke", "hydra/launcher=slurm"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "sbatch is not on PATH" in lines[0], p.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_a_job_log_holds_what_the_console_shows_and_progress_lines(tmp_path):
    """Off a terminal (here: a pipe) tqdm stays silent, so progress comes as log lines at the set
    rate; the run's Hydra log file holds them and the table, like the console."""
    env = os.environ | {"QEVAL_PROGRESS_SECONDS": "0"}
    p = subprocess.run([sys.executable, "-m", "qeval", "model=tiny-random", "task=passkey",
                        "task.passkey.lengths=[240]", "task.passkey.depths=[0.0,1.0]", "task.passkey.batch_size=1"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    progress = [l for l in p.stdout.splitlines() if l.startswith("passkey: ") and " samples " in l]
    assert len(progress) >= 3 and progress[-1].startswith("passkey: 4/4 samples (100%)"), p.stdout
    (log,) = (tmp_path / "results" / "hydra").rglob("qeval.log")
    text = log.read_text()
    for line in [*progress, "qeval: model tiny-random loaded in", "accuracy", "qeval: ok: "]:
        assert line in text, (line, text[-2000:])


def test_a_model_given_by_path_is_named_after_its_folder(tmp_path):
    import shutil

    from qeval.model.loading import ASSETS
    shutil.copytree(Path(ASSETS) / "toy", tmp_path / "my-model")
    p = qeval(f"model.path={tmp_path / 'my-model'}", "task=toy_mc", "task.toy_mc.n_samples=4",
              f"results_dir={tmp_path / 'results'}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert {r["model"] for r in rows_in(tmp_path / "results")} == {"my-model"}


# ---------------------------------------------------------------------------- suggested commands
SUGGESTING = [   # (overrides, what the suggested command must name when it runs)
    (["model=llama2-7b"], "model   meta-llama/Llama-2-7b-hf"),
    (["model.path=qeval-tests/not-a-real-model"], "model   qeval-tests/not-a-real-model"),
    (["model=tiny-random", "task=wikitext2"], "dataset Salesforce/wikitext/wikitext-2-raw-v1"),
    (["model=tiny-random", "method=gptq", "w_bits=4", "calibration.dataset=qeval-tests/absent"],
     "dataset qeval-tests/absent/en/c4-train"),
    (["kv_bits=2,4", "task.passkey.lengths=[240]", "task.passkey.depths=[0.5]"],
     "qeval sweep: 2 cells: done 2, skipped 0, failed 0"),
]


@pytest.mark.parametrize("overrides,names", SUGGESTING, ids=[" ".join(o) for o, _ in SUGGESTING])
def test_every_suggested_command_runs(overrides, names, tmp_path):
    """An error that suggests a command suggests one that works: the command in backticks is run
    as given (prefetch with --dry-run: there is no network here) and does what was promised."""
    p = qeval(*overrides, cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    suggested = re.findall(r"`(python -m [^`]+)`", p.stderr)
    assert len(suggested) == 1, p.stderr
    args = shlex.split(suggested[0])[1:]
    if args[:2] == ["-m", "qeval.prefetch"]:
        args.append("--dry-run")
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert names in run.stdout, run.stdout[-2000:]


def test_every_command_a_message_suggests_is_in_backticks():
    """So that the test above (and a user's copy and paste) finds exactly the command: in the text
    of every ConfigError qeval raises, each ``python -m ...`` stands right after a backtick."""
    import ast

    root = Path(__file__).resolve().parents[1] / "qeval"
    loose = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ConfigError":
                text = "".join(c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str))
                if re.search(r"(?<!`)python -m ", text):
                    loose.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not loose, loose


def test_a_single_run_is_validated_once(tmp_path, monkeypatch):
    # python -m qeval validates a single run whole before Hydra starts; its run must not repeat the
    # checks that read a tokenizer or index lm-eval's tasks (a sweep's cells validate in their run)
    import qeval.__main__ as entry_point
    import qeval.run
    from qeval import validate as validation

    calls = []
    checked = validation.validate

    def counting(cfg):
        calls.append(cfg)
        return checked(cfg)

    monkeypatch.setattr(qeval.run, "validate", counting)
    monkeypatch.setattr(validation, "_passed", set())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["qeval", "task=toy_mc", "task.toy_mc.n_samples=4", "task.toy_mc.batch_size=4"])
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        entry_point.entry()
    finally:   # Hydra configured logging for its job: the next test in this process gets it back as it was
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
    (run_dir,) = (tmp_path / "results" / "runs").iterdir()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"
    assert calls == []   # validated before Hydra, trusted in the run
    validation._passed.clear()   # a config this process never validated is validated in its run
    cfg = qeval.run.OmegaConf.load(run_dir / "config.yaml")
    cfg.force = True
    assert qeval.run.run(cfg)["status"] == "ok" and len(calls) == 1
