"""``python -m qeval.report`` on the smoke experiments: every table and figure, each figure a valid
PNG and PDF with the panels its rows call for, titled, every axis labelled with a unit, a legend
on every panel. (Grouping, failed runs and published numbers on hand-built runs:
``test_report_cells.py``, ``test_report_figures.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qeval.report.figures import build_figures
from qeval.report.gather import gather, headline

# the smoke experiments; a swept key on the command line replaces the experiment's list
SMOKES = {
    "qllm_eval_w_smoke": ["w_bits=2,16"],
    "qllm_eval_wa_smoke": [],
    "qllm_eval_kv_smoke": ["kv_bits=2,16"],
    "kivi_smoke": ["kv_bits=2"],
    "h2o_smoke": ["method.heavy_ratio=0.1,0.5"],
}
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
# the settings those sweeps produce (KV 100% of H2O is the full cache: fp16)
SETTINGS = {"W2", "W4A4", "W4A8", "W8A8", "KV2", "KV 20%", "fp16"}
BENCH = {"device": "Test GPU", "w_e2e": [
    {"config": c, "batch": b, "decode_tokens_per_s": t * b ** 0.8, "peak_memory_bytes": m + b * 2**28}
    for c, t, m in (("fp16", 30.0, 14 * 2**30), ("w4_g128", 80.0, 4 * 2**30)) for b in (1, 2, 4, 8)]}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> Path:
    """The smoke sweeps, all at once into one results directory (concurrent writers, too)."""
    root = tmp_path_factory.mktemp("smoke")
    procs = {name: subprocess.Popen([sys.executable, "-m", "qeval", f"experiment={name}",
                                     f"results_dir={root}", f"hydra.sweep.dir={root}/sweeps/{name}", *extra],
                                    cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, extra in SMOKES.items()}
    for name, p in procs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}:\n{out[-3000:]}"
        summary = json.loads((root / "sweeps" / name / "sweep_summary.json").read_text())
        # the W and WA sweeps share their fp16 baseline (method=group at 16 bits, one configuration):
        # whichever sweep reaches it second finds it done
        assert summary["failed"] == 0 and summary["done"] + summary["skipped"] == summary["cells"], \
            (name, summary, out[-3000:])
    (root / "bench").mkdir()
    (root / "bench" / "Test_GPU.json").write_text(json.dumps(BENCH))
    return root


@pytest.fixture(scope="module")
def report(smoke_results) -> tuple[Path, dict]:
    p = subprocess.run([sys.executable, "-m", "qeval.report", str(smoke_results)], env=ENV, check=False,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    out = smoke_results / "report"
    return out, json.loads((out / "manifest.json").read_text())


def test_every_row_lands_in_parquet_and_csv(smoke_results, report):
    out, _ = report
    n_rows = sum(len((d / "rows.jsonl").read_text().splitlines()) for d in (smoke_results / "runs").iterdir())
    n_runs = len(list((smoke_results / "runs").iterdir()))
    # every cell its own run, but for the W and WA baselines (one configuration); the other fp16
    # cells differ in method or semantics
    assert n_runs == 2 + 4 + 2 + 1 + 2 - 1
    parquet = pd.read_parquet(out / "rows.parquet")
    csv = pd.read_csv(out / "rows.csv")
    assert len(parquet) == len(csv) == n_rows
    assert set(gather(smoke_results)["setting"]) == SETTINGS


def test_tables_have_every_setting_and_deltas_to_the_baseline(report):
    out, manifest = report
    md = (out / "tables" / "passkey.md").read_text()
    tex = (out / "tables" / "passkey.tex").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    # on a CPU the baseline ran in float32: labelled fp32, not fp16
    for col in ("fp32", "group W2", "group W4A4", "group W4A8", "group W8A8", "group KV2", "kivi KV2",
                "h2o KV 20%"):
        assert f" {col} |" in header, (col, header)
    assert "cells also differ in" not in md, "every smoke cell is one setting"
    row = next(line for line in md.splitlines() if line.startswith("| toy |"))
    assert row.count("(+") + row.count("(-") == 7, row
    # the full-precision runs (W and WA sweeps, which share one, KV sweep and H2O's full budget) are
    # one baseline: 16 bits are an exact identity whatever the method, and the cell says how many
    # runs it holds
    assert "[n=3 runs]" in row.split("|")[2], row
    assert r"\begin{tabular}" in tex and r"\bottomrule" in tex and "KV 20\\%" in tex
    assert str(out / "tables" / "all.md") in manifest["tables"]
    assert (out / "tables" / "failed.md").read_text().startswith("### Failed runs\n\nNone.")


def _expected_panels(df: pd.DataFrame) -> dict[str, int]:
    h = headline(df)
    return {"bits_passkey": 2 * 3,          # W, WA, KV columns x (absolute, normalised)
            "budget_passkey": 1,
            "passkey_heatmap": 7 + 1,       # one panel per cell: the 7 quantized settings and fp32
            "kv_memory": 2 * h["model"].nunique(),
            "bench": 2}


def test_every_figure_is_a_valid_image_with_the_expected_panels(smoke_results, report):
    import matplotlib.image as mpimg
    _, manifest = report
    expected = _expected_panels(gather(smoke_results))
    assert {f["name"]: f["panels"] for f in manifest["figures"]} == expected
    for f in manifest["figures"]:
        img = mpimg.imread(f["png"])  # raises on a broken PNG
        assert img.ndim == 3 and min(img.shape[:2]) > 200, (f["name"], img.shape)
        assert float(np.std(img[..., :3])) > 0.01, f"{f['name']}: blank image"
        pdf = Path(f["pdf"]).read_bytes()
        assert pdf.startswith(b"%PDF") and b"%%EOF" in pdf[-64:], f["name"]


def test_figures_are_titled_and_every_axis_has_a_unit(smoke_results):
    figs = build_figures(gather(smoke_results), smoke_results / "bench")
    assert {name for name, _, _ in figs} == set(_expected_panels(gather(smoke_results)))
    for name, fig, panels in figs:
        assert fig.get_suptitle(), name
        data_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        assert len(data_axes) == panels, (name, len(data_axes))
        for ax in data_axes:
            assert ax.get_title(), name
            assert ax.get_xlabel(), f"{name}: x axis without a label"
            y = ax.get_ylabel()
            assert "(" in y and ")" in y, f"{name}: y axis label without a unit: {y!r}"
            if name != "kv_memory":  # its x axis is categorical (method and setting)
                assert "(" in ax.get_xlabel(), f"{name}: x axis label without a unit: {ax.get_xlabel()!r}"
            assert ax.get_legend() is not None and ax.get_legend().get_texts(), f"{name}: a panel without a legend"
