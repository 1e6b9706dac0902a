"""Passkey retrieval by prompt length x key depth: one heatmap panel per cell.

Panels follow :mod:`qeval.report.cells` on the per-(length, depth) rows, so runs with different
``lengths`` lists, seeds or any other knob get panels of their own instead of sharing averaged
squares. Each panel's legend says how many samples each square holds and how many runs the panel
is made of.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from qeval.report.cells import assign, cell_labels
from qeval.report.escape import LABEL_CHARS, cut, figure_text
from qeval.report.style import Style

TASK = "passkey"


def passkey_cells(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(panel title, rows) per cell of the passkey detail rows, in sorted order."""
    rows = df[(df["task"] == TASK) & (df["status"] == "ok")]
    if "length" not in rows or "depth" not in rows:
        return []
    rows = rows[rows["length"].notna() & rows["depth"].notna()]
    if rows.empty:
        return []
    rows, _ = assign(rows, {TASK})
    cells = sorted(set(rows["cell"]), key=repr)
    groups = [rows[rows["cell"].map(lambda c, cell=cell: c == cell)] for cell in cells]
    models, methods, settings, extras = zip(*cells)
    labels = cell_labels(methods, settings, extras, [g["dtype"].iloc[0] for g in groups])
    return [(figure_text(f"{cut(model)} · {label}", 4 * LABEL_CHARS), g) for model, label, g in zip(models, labels, groups)]


def _samples_label(g: pd.DataFrame) -> str:
    runs = g["run_dir"].nunique() if "run_dir" in g else 1
    per = sorted(g["n"].dropna().unique()) if "n" in g else []
    samples = "/".join(f"{x:g}" for x in per) if per else "?"
    return f"n = {samples} samples per square, {runs} run{'s' if runs != 1 else ''}"


def draw(ax, title: str, g: pd.DataFrame, colour) -> object:
    grid = g.pivot_table(index="length", columns="depth", values="value", aggfunc="mean").sort_index()
    image = ax.imshow(grid.values, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(grid.shape[1]), [f"{d:g}" for d in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(int(n)) for n in grid.index])
    for (i, k), v in np.ndenumerate(grid.values):
        if not np.isnan(v):
            ax.text(k, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.5 else "white")
    ax.set_title(title.replace(" [", "\n["), fontsize=8)
    ax.set_xlabel("key depth (fraction of the filler)")
    ax.set_ylabel("prompt length (tokens)")
    # the legend names the samples behind each square, in the method's colour
    ax.legend(handles=[Patch(color=colour, label=_samples_label(g))], fontsize="x-small",
              loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    return image


def passkey_heatmap(df: pd.DataFrame, style: Style) -> tuple[Figure, int] | None:
    panels = passkey_cells(df)
    if not panels:
        return None
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(3.8 * ncols + 1, 3.6 * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    image = None
    for ax, (title, g) in zip(axes, panels):
        method = g["method"].iloc[0] if g["target"].iloc[0] != "fp16" else None
        image = draw(ax, title, g, style.colour(method))
    for ax in axes[len(panels):]:
        ax.remove()
    fig.colorbar(image, ax=axes[:len(panels)].tolist(), label="retrieval accuracy (fraction)")
    fig.suptitle("Passkey retrieval by prompt length and key depth")
    return fig, len(panels)
