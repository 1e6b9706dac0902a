"""The kernel benchmark is one run: scripts/bench_kernels.py carries the packed-KV sections and
their options beside the weight kernels (the figures themselves need a GPU)."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_kernels_runs_the_kv_sections_too(capsys, monkeypatch):
    # as `python scripts/bench_kernels.py` runs it: the script's own folder is on the path
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = load("bench_kernels")
    assert {"ceilings", "w", "w_e2e", "kv", "kv_e2e"} <= set(bench.SECTIONS)
    if torch.cuda.is_available():
        pytest.skip("with a GPU this would run the benchmark")
    # the KV options parse; without CUDA the script stops with one line before measuring anything
    assert bench.main(["--sections", "kv", "--batch", "1", "8", "--context", "8192", "--bits", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and len(err.splitlines()) == 1
