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


def test_bench_quick_e2e_section_checks_then_times(monkeypatch, tmp_path):
    # the GPU section's own code on a tiny Llama on the CPU (kernels in the interpreter): the packed
    # cache's decode logits pass the check against KIVI's torch backend, and the cache is smaller
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = load("bench_quick")
    rows = []

    class Report:
        def add(self, key, row):
            rows.append((key, row))

    args = type("Args", (), {"layers": 1, "hidden": 64, "heads": 2, "kv_heads": 2, "intermediate": 128,
                             "prompt": 300, "steps": 1, "e2e_batch": [2]})()
    bench.section_e2e(args, Report(), device="cpu")
    (key, row), = rows
    assert key == "quick_e2e" and row["status"] == "ok", row
    # 302 tokens, R = 128, G = 32, fp32 on the interpreter: 256 keys and 174 values packed at 2 bits
    # plus a scale and zero per 32 (0.5 byte per element with capacity rounded up to R), the rest
    # fp32: about 0.39 of the uncompressed cache; 0.5 fails if nothing were packed
    assert row["cache_ratio"] < 0.5, row


def test_bench_decode_host_times_kivi_and_gear_steps(monkeypatch, tmp_path):
    # the host-cost benchmark in miniature (kernels stubbed, so no interpreter): one row per case
    import json
    bench = load("bench_decode_host")
    out = tmp_path / "host.json"
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)   # leave the session's threads
    assert bench.main(["--methods", "kivi", "gear", "--batch", "2", "--context", "300", "--steps", "3",
                       "--repeats", "3", "--out", str(out)],
                      patch=monkeypatch.setattr) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["batch"]) for r in rows] == [("kivi", 2), ("gear", 2)]
    assert all(r["us_decode_warm"] > 0 and r["us_update"] > 0 and r["status"] in ("ok", "over target")
               for r in rows), rows


def test_bench_cli_times_every_command_beside_import_torch(tmp_path):
    """One round of scripts/bench_cli.py: every command ran (the refusal with status 2), the single
    run's model-load line was seen, and every median is given as a ratio to import torch."""
    import json
    out = tmp_path / "cli.json"
    assert load("bench_cli").main(["--rounds", "1", "--out", str(out)]) == 0
    rows = {r["command"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(load("bench_cli").COMMANDS)
    assert rows["import torch"]["ratio_to_import_torch"] == 1.0
    assert rows["qeval method=unifrom (refused)"]["exit_codes"] == [2]
    assert all(r["exit_codes"] == [0] for name, r in rows.items() if "refused" not in name)
    run = rows["qeval single run"]
    assert 0 < run["median_to_model_load_s"] < run["median_s"]
