"""Every shell command in the README's ```bash blocks, run as written, in order, from a folder
outside the checkout; a new README line is covered without editing this file.

The only changes made to a command are what this machine cannot do (no downloads, no cluster):

- a model that would be downloaded (``model=llama2-7b``, or an ``experiment=`` whose sweep lists
  such models) runs as ``model=tiny-random`` (random weights from the same kind of config);
- lm-eval's datasets are tiny made-up files in the real schemas (``lm_eval_fixtures``), found
  through ``QEVAL_DATA_DIR``, the variable a cluster user points at ``python -m qeval.prefetch
  --data-dir`` output;
- ``pip install`` gets ``--dry-run`` (this environment is the installed one; ``.ci/run`` installs
  for real) and ``python -m pytest`` gets ``--collect-only`` (the suite cannot run itself); as
  they run outside the checkout, ``.`` in a pip argument and pytest's folder name the checkout;
- ``hydra/launcher=slurm`` needs ``sbatch``: where it is missing the command must refuse in one
  line with exit status 2, which is what a user without SLURM sees.

Each command must exit 0 (except that refusal) and write what the README says it writes: a run
its ``result.json``, a sweep its summary with no failed cell, the report its tables.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lm_eval_fixtures import write_bbh, write_gsm8k, write_longbench, write_mmlu

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "qeval" / "configs"
SLURM = "hydra/launcher=slurm"


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(_join(words))
    return out


def _join(words: list[str]) -> str:
    return " ".join(w if w == "&&" else shlex.quote(w) for w in words)


def downloaded_models() -> set[str]:
    """Model options whose weights come from the hub (not embedded, not random)."""
    out = set()
    for p in (CONFIGS / "model").glob("*.yaml"):
        node = yaml.safe_load(p.read_text())
        if not node.get("random_config") and not str(node.get("path", "")).startswith("@"):
            out.add(p.stem)
    return out


def sweeps_downloaded_models(experiment: str) -> bool:
    node = yaml.safe_load((CONFIGS / "experiment" / f"{experiment}.yaml").read_text()) or {}
    params = ((node.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    if "model" in params:   # the study's own list replaces its parent's
        return bool({m.strip() for m in str(params["model"]).split(",")} & downloaded_models())
    parents = [d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return any(sweeps_downloaded_models(p) for p in parents)


def substituted(command: str) -> str:
    """The command as this machine can run it (see the module docstring); nothing else changes."""
    parts = []
    for piece in command.split(" && "):
        words = shlex.split(piece)
        if words[:2] == ["pip", "install"]:   # the checkout, wherever the command runs
            words = [str(ROOT) + w[1:] if w.startswith(".") else w for w in words] + ["--dry-run"]
        elif words[:3] == ["python", "-m", "pytest"]:
            words += [str(ROOT), "--collect-only", "-q"]
        elif words[:3] == ["python", "-m", "qeval"]:
            big = downloaded_models()
            words = ["model=tiny-random" if w.startswith("model=") and w[6:] in big else w for w in words]
            experiment = next((w.partition("=")[2] for w in words if w.startswith("experiment=")), None)
            if experiment and sweeps_downloaded_models(experiment) and not any(w.startswith("model=") for w in words):
                words.append("model=tiny-random")
        parts.append(_join(words))
    return " && ".join(parts)


COMMANDS = readme_commands((ROOT / "README.md").read_text())


def test_the_readme_has_commands_to_run():
    assert any(c.startswith("python -m qeval") for c in COMMANDS) and len(COMMANDS) >= 10, COMMANDS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder outside the checkout with made-up datasets for the lm-eval tasks."""
    from lm_eval.tasks import TaskManager

    from qeval.tasks.lm_eval.tasks import leaf_configs

    base = tmp_path_factory.mktemp("readme")
    data = base / "data"
    manager = TaskManager()
    writers = {"openai/gsm8k": lambda names: write_gsm8k(data), "cais/mmlu": lambda names: write_mmlu(data, names),
               "SaylorTwift/bbh": lambda names: write_bbh(data, names),
               "Xnhyacinth/LongBench": lambda names: write_longbench(data, names)}
    for task in ("gsm8k", "mmlu", "bbh", "longbench"):   # qeval's lm-eval tasks, as their configs name them
        lm_tasks = yaml.safe_load((CONFIGS / "task" / f"{task}.yaml").read_text())["lm_eval_tasks"]
        leaves = leaf_configs(manager, lm_tasks).values()
        for path in {leaf["dataset_path"] for leaf in leaves}:
            writers[path](sorted({leaf.get("dataset_name") for leaf in leaves if leaf["dataset_path"] == path}))
    work = base / "work"
    work.mkdir()
    return work, data


def run_readme_command(command: str, workdir) -> subprocess.CompletedProcess:
    work, data = workdir
    env = os.environ | {"QEVAL_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", substituted(command)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_as_written(command, workdir):
    work, _ = workdir
    runs = work / "results" / "runs"
    before = set(runs.glob("*/result.json")) if runs.exists() else set()
    p = run_readme_command(command, workdir)
    out = p.stdout + p.stderr
    shown = f"$ {substituted(command)}\n{out[-3000:]}"
    if SLURM in command and shutil.which("sbatch") is None:
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode == 2 and len(lines) == 1 and "sbatch is not on PATH" in lines[0], shown
        return
    assert p.returncode == 0, shown
    assert "Traceback" not in out, shown
    for piece in command.split(" && "):
        if piece.startswith("python -m qeval.report"):
            assert list((work / "results" / "report").rglob("*.md")), shown
        elif re.match(r"python -m qeval( |$)", piece):
            args = piece.split()[3:]
            sweep = "-m" in args or "--multirun" in args or "experiment=" in piece or not args  # no args: the demo
            after = set(runs.glob("*/result.json"))
            if sweep:
                summary = re.search(r"qeval sweep: \d+ cells: done (\d+), skipped (\d+), failed 0", out)
                assert summary, shown
                # a cell an earlier README line computed is skipped, as the README says
                assert after - before or int(summary.group(2)) > 0, shown
            else:
                assert re.search(r"qeval: ok: \S+", out), shown
                assert after - before or "already done" in out, shown
        elif piece.startswith("python -m pytest"):
            assert re.search(r"^tests/test_\w+\.py: \d+$", out, flags=re.M), shown   # -q: tests per file
