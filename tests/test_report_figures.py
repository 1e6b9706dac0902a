"""Figures: a legend on every panel, one colour per method in every panel and figure (whether or
not a model has a full-precision run), titles and axes that name the metric plotted, the
baseline named by its dtype, and lines and heatmap panels split by every differing knob."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.colors import to_hex
from test_report_cells import write

from qeval.report.figures import build_figures
from qeval.report.gather import gather

MEMORY = {"kv_bytes_held": 4 * 2**20, "kv_bytes_packed": 2**20, "peak_memory_bytes": 2**28,
          "peak_memory_kind": "cpu_rss"}
PASSKEY_CELLS = [{"length": L, "depth": d, "value": v} for L, d, v in
                 ((256, 0.0, 1.0), (256, 1.0, 0.5), (512, 0.0, 0.5), (512, 1.0, 0.0))]


def study(root: Path, baseline_of_b: bool = True) -> Path:
    """Two models, three methods on W, WA and KV, a knob that splits one cell, quant_error, and
    passkey breakdowns; model ``b``'s full-precision run (under yet another method) optional."""
    write(root, 1.0, method="group", details=PASSKEY_CELLS, columns=MEMORY)
    write(root, 0.8, w_bits=4, method="group")
    write(root, 0.6, w_bits=4, a_bits=8)
    write(root, 0.7, kv_bits=4, columns=MEMORY)
    write(root, 0.5, kv_bits=2, details=PASSKEY_CELLS, columns=MEMORY)
    write(root, 0.3, kv_bits=2, kv_semantics="simulated", columns=MEMORY)
    write(root, 0.4, kv_bits=2, method="kivi", columns=MEMORY)
    if baseline_of_b:
        write(root, 0.9, model="b", method="streaming", columns=MEMORY)
    write(root, 0.45, kv_bits=2, model="b", columns=MEMORY)
    write(root, 0.35, kv_bits=2, model="b", method="kivi", columns=MEMORY)
    write(root, 0.0, task="quant_error", metric="logits_kl")
    write(root, 3e-5, kv_bits=4, task="quant_error", metric="logits_kl")
    (root / "bench").mkdir()
    (root / "bench" / "gpu.json").write_text(json.dumps({"device": "GPU", "rows": [
        {"config": "fp16", "batch": b, "decode_tokens_per_s": 10.0 * b, "peak_memory_bytes": 2**30} for b in (1, 2)]}))
    return root


def figures(root: Path) -> dict:
    return {name: fig for name, fig, _ in build_figures(gather(root), root / "bench")}


def data_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def method_colours(figs: dict) -> dict[str, set[str]]:
    """Method -> the colours its lines have across every panel of the bits and budget figures."""
    out: dict[str, set[str]] = {}
    for name, fig in figs.items():
        if not name.startswith(("bits_", "budget_")):
            continue
        for ax in fig.axes:
            for line in ax.get_lines():
                label = line.get_label()
                if " · " in label:
                    method = label.split(" · ")[1].split(" ")[0]
                    out.setdefault(method, set()).add(to_hex(line.get_color()))
    return out


def test_every_panel_of_every_figure_has_a_legend(tmp_path):
    figs = figures(study(tmp_path))
    assert {"bits_passkey", "bits_quant_error", "passkey_heatmap", "kv_memory", "bench"} <= set(figs)
    for name, fig in figs.items():
        for ax in data_axes(fig):
            legend = ax.get_legend()
            assert legend is not None and legend.get_texts(), f"{name}: panel {ax.get_title()!r} has no legend"


def test_a_method_has_one_colour_everywhere_with_or_without_a_baseline(tmp_path):
    with_base = method_colours(figures(study(tmp_path / "a")))
    without = method_colours(figures(study(tmp_path / "b", baseline_of_b=False)))
    assert set(with_base) == {"group", "uniform", "kivi"}
    assert all(len(c) == 1 for c in with_base.values()), with_base
    assert with_base == without
    assert len({c for cs in with_base.values() for c in cs}) == 3, "two methods share a colour"


def test_relative_panels_name_their_baseline_and_list_every_line(tmp_path):
    fig = figures(study(tmp_path))["bits_passkey"]
    relative = [ax for ax in fig.axes if "relative to" in ax.get_title()]
    assert len(relative) == 3
    for ax in relative:
        assert ax.get_title().endswith("relative to fp32") and "fp32" in ax.get_ylabel()
        assert [t.get_text() for t in ax.get_xticklabels()][-1] == "fp32"
    kv = next(ax for ax in relative if ax.get_title().startswith("KV"))
    labels = [t.get_text() for t in kv.get_legend().get_texts()]
    assert "toy · uniform [kv_semantics=simulated]" in labels and "toy · uniform [kv_semantics=cache]" in labels
    assert "lines also differ in: kv_semantics" in fig.get_suptitle()


def test_quant_error_figures_name_their_metric_not_accuracy(tmp_path):
    fig = figures(study(tmp_path))["bits_quant_error"]
    texts = [fig.get_suptitle()] + [t for ax in fig.axes for t in (ax.get_title(), ax.get_ylabel())]
    assert all("accuracy" not in t for t in texts), texts
    assert "logits_kl" in fig.get_suptitle() and "KL divergence" in fig.axes[0].get_ylabel()


def test_a_model_without_baseline_still_has_its_lines_in_the_relative_legend(tmp_path):
    fig = figures(study(tmp_path, baseline_of_b=False))["bits_passkey"]
    kv = next(ax for ax in fig.axes if ax.get_title() == "KV: accuracy relative to fp32")
    labels = [t.get_text() for t in kv.get_legend().get_texts()]
    assert "b · uniform [kv_semantics=cache] (no fp32 run with these knobs)" in labels


def test_heatmap_panels_are_cells_with_their_samples(tmp_path):
    write(tmp_path, 0.5, kv_bits=2, details=PASSKEY_CELLS)
    write(tmp_path, 0.5, kv_bits=2, details=PASSKEY_CELLS[:2], **{"task.passkey.lengths": [256]})
    fig = figures(tmp_path)["passkey_heatmap"]
    axes = data_axes(fig)
    assert len(axes) == 2, "runs with different lengths lists share a heatmap"
    assert all("task.passkey.lengths=" in ax.get_title() for ax in axes)
    assert all(ax.get_legend().get_texts()[0].get_text() == "n = 2 samples per square, 1 run" for ax in axes)
