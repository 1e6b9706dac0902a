"""KV bytes and memory per cell: the bytes a KV cache actually held (measured) beside the bytes a
packed layout would need (a formula), and peak memory. Fake quantization saves nothing, which
this figure shows. One pair of panels per model, on the task that saw the most settings; bars
follow the cells of :mod:`qeval.report.cells` and take their method's colour (full precision in
the neutral colour), the packed layout hatched.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from qeval.report.cells import assign, cell_labels
from qeval.report.escape import LABEL_CHARS, cut, figure_text
from qeval.report.gather import BREAKDOWN_COLUMNS
from qeval.report.style import Style, missing

MIB = 2**20
WIDE = 4 * LABEL_CHARS   # a label made of several names, each cut to LABEL_CHARS
BYTES = ["kv_bytes_held", "kv_bytes_packed", "peak_memory_bytes"]


def memory_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of finished runs that touch the KV cache, one number per (run, task, metric)."""
    ok = df[(df["status"] == "ok") & df["target"].isin(["fp16", "KV", "KV-evict"])]
    for c in BREAKDOWN_COLUMNS:
        if c in ok:
            ok = ok[ok[c].isna()]
    if "kv_bytes_held" not in ok:
        return ok.iloc[0:0]
    return ok[ok["kv_bytes_held"].notna()]


def bars_of(m: pd.DataFrame, task: str) -> pd.DataFrame:
    """Mean bytes per cell of one model's rows on one task, with the cell's label and method."""
    rows, _ = assign(m[m["task"] == task], {task})
    cells = sorted(set(rows["cell"]), key=lambda c: (c[1] is not None, repr(c)))   # baseline first
    groups = [rows[rows["cell"].map(lambda c, cell=cell: c == cell)] for cell in cells]
    _, methods, settings, extras = zip(*cells)
    labels = cell_labels(methods, settings, extras, [g["dtype"].iloc[0] for g in groups])
    return pd.DataFrame([{"label": tick(figure_text(label, WIDE)), "method": method,
                          **{b: pd.to_numeric(g[b], errors="coerce").mean() if b in g else np.nan for b in BYTES}}
                         for label, method, g in zip(labels, methods, groups)])


def tick(label: str) -> str:
    """``uniform KV2 [a=1, b=2]`` -> one part per line, so that neighbouring ticks do not overlap."""
    return label.replace(" ", "\n", 1).replace(" [", "\n[").replace(", ", ",\n")


def figure_width(bars) -> float:
    """Inches enough for the most bars of one model side by side, their ticks not overlapping."""
    widest = max((len(line) for _, _, per in bars for label in per["label"] for line in label.split("\n")), default=8)
    most = max((len(per) for _, _, per in bars), default=1)
    return max(6.0, 2.5 + most * max(1.1, 0.075 * widest))


def legend(ax, per: pd.DataFrame, style: Style, hatched: bool) -> None:
    handles = [Patch(color=style.colour(m), label="full precision" if missing(m) else figure_text(m))
               for m in dict.fromkeys(per["method"])]
    if hatched:
        handles += [Patch(facecolor="white", edgecolor="black", label="solid: held (measured)"),
                    Patch(facecolor="white", edgecolor="black", hatch="//", label="hatched: packed layout (formula)")]
    ax.legend(handles=handles, fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def kv_memory_figure(df: pd.DataFrame, style: Style) -> tuple[Figure, int] | None:
    """Per model: KV bytes held vs packed, and peak memory, for every cell."""
    ok = memory_rows(df)
    if ok.empty:
        return None
    models = sorted(ok["model"].astype(str).unique())
    bars = {}
    for model in models:
        m = ok[ok["model"].astype(str) == model]
        task = m.groupby("task")["setting"].nunique().idxmax()  # the task that saw the most settings
        bars[model] = (m, task, bars_of(m, task))
    fig = Figure(figsize=(figure_width(bars.values()), 4.4 * len(models)), layout="constrained")
    axes = fig.subplots(2 * len(models), 1, squeeze=False)[:, 0]
    for i, (model, (m, task, per)) in enumerate(bars.items()):
        colours = [style.colour(meth) for meth in per["method"]]
        x = np.arange(len(per))
        ax = axes[2 * i]
        ax.bar(x - 0.2, per["kv_bytes_held"] / MIB, 0.4, color=colours)
        ax.bar(x + 0.2, per["kv_bytes_packed"] / MIB, 0.4, color=colours, hatch="//", edgecolor="white")
        ax.set_xticks(x, per["label"], fontsize=7)
        ax.set_ylabel("KV cache (MiB)")
        ax.set_xlabel("method and setting")
        ax.set_title(figure_text(f"{cut(model)} on {cut(task)}: KV bytes held vs packed", WIDE))
        legend(ax, per, style, hatched=True)
        ax = axes[2 * i + 1]
        kinds = m["peak_memory_kind"].dropna() if "peak_memory_kind" in m else pd.Series(dtype=object)
        kind = kinds.iloc[0] if not kinds.empty else "peak"
        ax.bar(x, per["peak_memory_bytes"] / MIB, 0.5, color=colours)
        ax.set_xticks(x, per["label"], fontsize=7)
        ax.set_ylabel(figure_text(f"peak memory (MiB, {cut(kind)})", WIDE))
        ax.set_xlabel("method and setting")
        ax.set_title(figure_text(f"{cut(model)} on {cut(task)}: peak memory", WIDE))
        legend(ax, per, style, hatched=False)
    fig.suptitle("KV-cache bytes and memory per method")
    return fig, 2 * len(models)
