"""A built wheel works from any folder: the configs ship inside the package, so the default job, a
sweep and the report run with the checkout nowhere on the path.

The wheel is built from the checkout (``pip wheel``, build isolation as a user gets it) and
unpacked with ``pip install --no-deps --target``; the commands then run from a folder outside the
checkout with that folder first on ``PYTHONPATH``, ahead of this environment's editable install
(the dependencies are this environment's: what is tested is the wheel's own files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    # a copy of the sources: setuptools builds in the source tree (build/, *.egg-info)
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "build", "results",
                                                                  "*.egg-info", "__pycache__", ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(base / "dist"),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (base / "dist").glob("qeval-*.whl")
    site = base / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                                str(site), str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return wheel, site, elsewhere


def from_wheel(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def test_the_wheel_carries_the_configs_and_assets(wheel_site):
    wheel, _, _ = wheel_site
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("qeval/configs/config.yaml", "qeval/configs/experiment/demo.yaml",
                   "qeval/configs/hydra/launcher/local.yaml", "qeval/configs/hydra/job_logging/qeval.yaml",
                   "qeval/configs/model/tiny-random.yaml", "hydra_plugins/qeval_launchers/__init__.py",
                   "qeval/prefetch/__main__.py"):
        assert needed in names, needed
    assert any(n.startswith("qeval/assets/toy/") for n in names)


def test_default_job_sweep_and_report_from_a_wheel_outside_the_checkout(wheel_site):
    _, site, elsewhere = wheel_site
    where = from_wheel(site, elsewhere, "-c", "import qeval; print(qeval.__file__, qeval.CONFIG_DIR)")
    assert where.returncode == 0 and where.stdout.startswith(str(site)), where.stdout + where.stderr
    demo = from_wheel(site, elsewhere, "-m", "qeval")
    assert demo.returncode == 0 and "3 cells: done 3, skipped 0, failed 0" in demo.stdout, demo.stderr[-3000:]
    sweep = from_wheel(site, elsewhere, "-m", "qeval", "-m", "model=tiny-random", "kv_bits=16,4",
                       "task.passkey.lengths=[240]", "task.passkey.depths=[0.5]")
    assert sweep.returncode == 0 and "2 cells: done 2, skipped 0, failed 0" in sweep.stdout, sweep.stderr[-3000:]
    report = from_wheel(site, elsewhere, "-m", "qeval.report", "results/")
    assert report.returncode == 0, report.stderr[-3000:]
    assert list((elsewhere / "results" / "report").rglob("*.md"))
    rows = [json.loads(line) for f in (elsewhere / "results" / "runs").glob("*/rows.jsonl")
            for line in f.read_text().splitlines()]
    assert {r["model"] for r in rows} == {"toy", "tiny-random"}
