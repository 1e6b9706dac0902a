"""Figures from rows: PNG and PDF, titled, axes labelled with units, a legend on every panel.

Built on ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot): no global figure state
and no display needed, so reports render the same on a cluster login node and in CI.

Lines and panels follow the cells of :mod:`qeval.report.cells`: runs that differ in any knob are
never averaged into one point, and a legend label carries the knob values that tell its line
apart (``toy · uniform [kv_semantics=simulated]``). A method has one colour in every panel and
figure, a model one marker, a knob variant one line style (:mod:`qeval.report.style`). Titles and
axis labels name the metric actually plotted (a reconstruction error is not an accuracy).

* ``bits_<task>``: Qllm-Eval-style metric against bit width, one column per target (W, WA, KV),
  one line per (model, method, knobs); top row absolute, bottom row relative to the
  full-precision run of the same model and knobs (labelled by its dtype: fp32, bf16, fp16).
* ``budget_<task>``: the metric against the KV budget for evicting methods (H2O).
* ``passkey_heatmap``: passkey accuracy per prompt length x key depth, one panel per cell.
* ``kv_memory``: KV bytes actually held next to the bytes a packed layout would need, and peak
  memory, per cell; fake quantization saves nothing, which this figure shows.
* ``bench``: decode throughput and peak memory against batch size from ``results/bench/*.json``.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from qeval.report.bench import bench_figure, read_bench
from qeval.report.cells import task_cells
from qeval.report.escape import LABEL_CHARS, cut, file_name, printable
from qeval.report.escape import figure_text as label
from qeval.report.gather import headline
from qeval.report.heatmap import passkey_heatmap
from qeval.report.memory import kv_memory_figure
from qeval.report.safe_read import one_line_error
from qeval.report.style import (
    Style,
    baseline_label,
    direction,
    knob_suffix,
    metric_label,
    missing,
)

# a text made of several names (each cut to LABEL_CHARS) is cut again at this length
WIDE = 4 * LABEL_CHARS
TARGET_AXIS = {"W": "weight bit width (bits)", "WA": "weights / activations (bits)",
               "KV": "KV-cache bit width (bits)"}


def save(fig: Figure, out_dir: Path, name: str, panels: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{name}.png", out_dir / f"{name}.pdf"
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(pdf, bbox_inches="tight")
    return {"name": name, "png": str(png), "pdf": str(pdf), "panels": panels}


def x_label(target: str, c) -> str:
    """A cell's tick on its target's axis: ``4`` (W, KV), ``W4A8`` (WA), ``K4V2`` (K != V)."""
    if target == "WA":
        return f"W{int(c['bits'])}A{int(c['a_bits'])}"
    if target == "KV":
        return label(str(c["setting"]).removeprefix("KV"))
    return str(int(c["bits"]))


def x_categories(target: str, g: pd.DataFrame, base: str) -> list[str]:
    """Ordered ticks of one target's panel, full precision last."""
    order = sorted({(c["bits"], -(c["a_bits"] if pd.notna(c["a_bits"]) else 16), x_label(target, c))
                    for _, c in g.iterrows()})
    return list(dict.fromkeys(label for *_, label in order)) + [base]


def lines_of(cells: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """(model, method, knobs) -> that line's cells, in sorted order."""
    keys = list(zip(cells["model"], cells["method"], cells["line_extra"]))
    groups: dict[tuple, list] = {}
    for key, idx in zip(keys, cells.index):
        groups.setdefault(key, []).append(idx)
    return [(k, cells.loc[groups[k]]) for k in sorted(groups, key=repr)]


def unique_baseline(line: pd.DataFrame):
    """The full-precision value of a line when its cells share one baseline; else None."""
    values = set(line["baseline"].dropna())
    return values.pop() if len(values) == 1 else None


def line_label(model, method, extra) -> str:
    """``model · method [knobs]``; a long one wrapped, so that its legend leaves the panel room."""
    text = label(f"{cut(model)} · {cut(method)}{knob_suffix(extra)}", WIDE)
    return text if len(text) <= LABEL_CHARS else "\n".join(textwrap.wrap(text, LABEL_CHARS // 2))


def plot_target(ax, rel, target: str, g: pd.DataFrame, base: str, style: Style) -> bool:
    """One target's absolute and relative panels; whether any line could be normalised."""
    normalised = False
    cats = x_categories(target, g, base)
    for (model, method, extra), line in lines_of(g):
        kw = style.line(model, method, extra) | {"label": line_label(model, method, extra)}
        pts = {x_label(target, c): (c["value"], c["baseline"]) for _, c in line.iterrows()}
        b = unique_baseline(line)
        xs = [cats.index(x) for x in pts] + ([len(cats) - 1] if b is not None else [])
        ys = [v for v, _ in pts.values()] + ([b] if b is not None else [])
        order = np.argsort(xs)
        ax.plot(np.array(xs)[order], np.array(ys)[order], **kw)
        ratio = [(cats.index(x), v / bv) for x, (v, bv) in pts.items() if not missing(bv) and bv]
        if ratio:
            ratio += [(len(cats) - 1, 1.0)]
            rx, ry = zip(*sorted(ratio))
            rel.plot(rx, ry, **kw)
            normalised = True
        else:   # still in the legend, so every panel names every line
            why = f"{base} value is 0" if line["baseline"].notna().any() else f"no {base} run with these knobs"
            rel.plot([], [], **(kw | {"label": kw["label"] + f" ({why})"}))
    for a in (ax, rel):
        a.set_xticks(range(len(cats)), cats)
        a.set_xlim(-0.3, len(cats) - 0.7)
        a.set_xlabel(TARGET_AXIS[target])
        a.grid(alpha=0.3)
        a.legend(fontsize="x-small", handlelength=3.5)   # long enough to tell line styles apart
    return normalised


def bits_figure(cells: pd.DataFrame, task: str, split: list[str], style: Style) -> tuple[Figure, int] | None:
    """The metric against bit width per target for one task's cells."""
    quant = cells[cells["method"].notna()]
    targets = [t for t in ("W", "WA", "KV") if (quant["target"] == t).any()]
    if not targets:
        return None
    metric = cells["metric"].iloc[0]
    base = baseline_label(cells.loc[cells["method"].isna(), "dtype"])
    fig = Figure(figsize=(4.8 * len(targets), 7.0), layout="constrained")
    axes = fig.subplots(2, len(targets), squeeze=False)
    for j, target in enumerate(targets):
        ax, rel = axes[0, j], axes[1, j]
        normalised = plot_target(ax, rel, target, quant[quant["target"] == target], base, style)
        ax.set_title(label(f"{target}: {cut(metric)}", WIDE))
        ax.set_ylabel(label(metric_label(metric), WIDE))
        rel.set_title(label(f"{target}: {cut(metric)} relative to {base}", WIDE))
        rel.set_ylabel(label(f"{cut(metric)} / {base} {cut(metric)} (ratio)", WIDE))
        rel.axhline(1.0, color="grey", lw=0.8, ls="--")
        if not normalised:
            rel.text(0.5, 0.3, f"no nonzero {base} value to normalise by", ha="center",
                     va="center", transform=rel.transAxes, color="grey")
    fig.suptitle(label(f"{cut(task)}: {cut(metric)} against bit width{direction(metric)}", WIDE)
                 + split_note(split))
    return fig, 2 * len(targets)


def split_note(split: list[str]) -> str:
    return "\n" + label("lines also differ in: " + ", ".join(map(cut, split)), WIDE) if split else ""


def budget_figure(cells: pd.DataFrame, task: str, split: list[str], style: Style) -> tuple[Figure, int] | None:
    """The metric against the fraction of the prompt an evicting method keeps."""
    g = cells[cells["kv_budget"].notna() & cells["method"].notna()]
    if g.empty:
        return None
    metric = cells["metric"].iloc[0]
    fig = Figure(figsize=(6.0, 4.4), layout="constrained")
    ax = fig.subplots()
    for (model, method, extra), line in lines_of(g):
        pts = line.groupby("kv_budget")["value"].first().sort_index()
        xs, ys = list(pts.index * 100), list(pts.values)
        if (b := unique_baseline(line)) is not None and 100 not in xs:
            xs, ys = xs + [100.0], ys + [b]   # the full cache is the full-precision run
        ax.plot(xs, ys, **style.line(model, method, extra), label=line_label(model, method, extra))
    ax.set_xlabel("KV budget (% of the prompt kept)")
    ax.set_ylabel(label(metric_label(metric), WIDE))
    ax.set_title(label(f"{cut(task)}: {cut(metric)}", WIDE))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", handlelength=3.5)
    fig.suptitle(label(f"{cut(task)}: {cut(metric)} against KV budget (eviction){direction(metric)}", WIDE)
                 + split_note(split))
    return fig, 1


def task_figures(h: pd.DataFrame, style: Style) -> list[tuple[str, Figure, int]]:
    """``bits_<task>`` and ``budget_<task>`` for every task of the headline rows."""
    per_task = {task: task_cells(g, task) for task, g in sorted(h.groupby("task"), key=lambda kv: kv[0])}
    style.register_variants(e for cells, _ in per_task.values() for e in cells["line_extra"])
    built = []
    for task, (cells, split) in per_task.items():
        safe = file_name(task)
        built += [(f"bits_{safe}", *f)] if (f := bits_figure(cells, task, split, style)) else []
        built += [(f"budget_{safe}", *f)] if (f := budget_figure(cells, task, split, style)) else []
    return built


def build_figures(df: pd.DataFrame, bench_dir: Path | None = None) -> list[tuple[str, Figure, int]]:
    """Every figure the rows support, as (file stem, figure, number of data panels)."""
    built = []
    if not df.empty:
        style = Style(df)
        h = headline(df)
        built += task_figures(h, style) if not h.empty else []
        built += [("passkey_heatmap", *f)] if (f := passkey_heatmap(df, style)) else []
        built += [("kv_memory", *f)] if (f := kv_memory_figure(df, style)) else []
    if bench_dir is not None and (f := bench_figure(read_bench(bench_dir))):
        built.append(("bench", *f))
    return built


def write_figures(df: pd.DataFrame, out_dir: Path, bench_dir: Path | None = None) -> list[dict]:
    """Write every figure as PNG and PDF; returns one record per figure (name, files, panels).
    A figure matplotlib cannot draw (too many panels for an image, say) is named on stderr and
    left out; the other figures and the tables are still written."""
    written = []
    for name, fig, panels in build_figures(df, bench_dir):
        try:
            written.append(save(fig, out_dir, name, panels))
        except (ValueError, OverflowError) as e:   # what drawing raises; OSError (writing) is not caught
            print(f"qeval.report: warning: figure {name} not drawn ({printable(one_line_error(e))})",
                  file=sys.stderr)
    return written
