"""Figures from rows: PNG and PDF, titled, axes labelled with units.

Built on ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot): no global figure state
and no display needed, so reports render the same on a cluster login node and in CI.

* ``bits_<task>``: Qllm-Eval-style accuracy against bit width, one column per target (W, WA, KV),
  one line per model (and method, when a panel holds several); top row absolute, bottom row
  normalised to the same model's fp16 value.
* ``budget_<task>``: accuracy against the KV budget for evicting methods (H2O).
* ``passkey_heatmap``: passkey accuracy per prompt length x key depth, one panel per
  (model, method, setting).
* ``kv_memory``: KV bytes actually held next to the bytes a packed layout would need, and peak
  memory, per method and setting; fake quantization saves nothing, which this figure shows.
* ``bench``: decode throughput and peak memory against batch size from ``results/bench/*.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from qeval.report.gather import baseline_of, headline

MIB = 2**20
TARGET_AXIS = {"W": "weight bit width (bits)", "WA": "weights / activations (bits)",
               "KV": "KV-cache bit width (bits)"}


def _save(fig: Figure, out_dir: Path, name: str, panels: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{name}.png", out_dir / f"{name}.pdf"
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(pdf, bbox_inches="tight")
    return {"name": name, "png": str(png), "pdf": str(pdf), "panels": panels}


def _x_categories(target: str, g: pd.DataFrame) -> list[str]:
    """Ordered x labels of one target's panel, fp16 last."""
    if target == "WA":
        pairs = sorted({(int(w), int(a)) for w, a in zip(g["w_bits"], g["a_bits"])})
        return [f"W{w}A{a}" for w, a in pairs] + ["fp16"]
    return [str(int(b)) for b in sorted(set(g["bits"]))] + ["16"]


def _x_label(target: str, r) -> str:
    return f"W{int(r['w_bits'])}A{int(r['a_bits'])}" if target == "WA" else str(int(r["bits"]))


def bits_figure(h: pd.DataFrame, task: str) -> tuple[Figure, int] | None:
    """Accuracy against bit width per target for one task's headline rows."""
    targets = [t for t in ("W", "WA", "KV") if (h["target"] == t).any()]
    if not targets:
        return None
    base = baseline_of(h).set_index("model")["fp16_value"]
    metric = h["metric"].iloc[0]
    fig = Figure(figsize=(4.2 * len(targets), 6.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(2, len(targets), squeeze=False))
    for j, target in enumerate(targets):
        g = h[h["target"] == target]
        cats = _x_categories(target, g)
        several_methods = g["method"].nunique() > 1
        for (model, method), line in g.groupby(["model", "method"]):
            pts = line.groupby(line.apply(lambda r: _x_label(target, r), axis=1))["value"].mean()
            if model in base.index:
                pts[cats[-1]] = base[model]
            pts = pts.reindex([c for c in cats if c in pts.index])
            xs = [cats.index(c) for c in pts.index]
            label = f"{model} · {method}" if several_methods else model
            axes[0, j].plot(xs, pts.values, marker="o", label=label)
            if model in base.index and base[model]:
                axes[1, j].plot(xs, pts.values / base[model], marker="o", label=label)
        for i in range(2):
            ax = axes[i, j]
            ax.set_xticks(range(len(cats)), cats)
            ax.set_xlim(-0.3, len(cats) - 0.7)
            ax.set_xlabel(TARGET_AXIS[target])
            ax.grid(alpha=0.3)
        axes[0, j].set_title(f"{target}: {metric}")
        axes[0, j].set_ylabel(f"{metric} (fraction)")
        axes[1, j].set_title(f"{target}: relative to fp16")
        axes[1, j].set_ylabel("value / fp16 value (ratio)")
        axes[1, j].axhline(1.0, color="grey", lw=0.8, ls="--")
        if not axes[1, j].get_legend_handles_labels()[0]:  # every fp16 value is 0 or missing
            axes[1, j].text(0.5, 0.5, "no nonzero fp16 value to normalise by", ha="center",
                            va="center", transform=axes[1, j].transAxes, color="grey")
        axes[0, j].legend(fontsize="small")
    fig.suptitle(f"{task}: accuracy against bit width")
    return fig, 2 * len(targets)


def budget_figure(h: pd.DataFrame, task: str) -> tuple[Figure, int] | None:
    """Accuracy against the fraction of the prompt an evicting method keeps."""
    g = h[h["kv_budget"].notna()]
    if g.empty:
        return None
    metric = h["metric"].iloc[0]
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    for (model, method), line in g.groupby(["model", "method"]):
        pts = line.groupby("kv_budget")["value"].mean().sort_index()
        ax.plot(pts.index * 100, pts.values, marker="o", label=f"{model} · {method}")
    ax.set_xlabel("KV budget (% of the prompt kept)")
    ax.set_ylabel(f"{metric} (fraction)")
    ax.set_title(f"{task}: {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(f"{task}: accuracy against KV budget (eviction)")
    return fig, 1


def passkey_heatmap(df: pd.DataFrame) -> tuple[Figure, int] | None:
    cells = df[(df["task"] == "passkey") & (df["status"] == "ok")]
    if "length" not in cells:
        return None
    cells = cells[cells["length"].notna() & cells["depth"].notna()]
    if cells.empty:
        return None
    groups = list(cells.groupby(["model", "method", "setting"]))
    ncols = min(4, len(groups))
    nrows = -(-len(groups) // ncols)
    fig = Figure(figsize=(3.6 * ncols + 1, 3.0 * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    image = None
    for ax, ((model, method, setting), g) in zip(axes, groups):
        grid = g.pivot_table(index="length", columns="depth", values="value", aggfunc="mean").sort_index()
        image = ax.imshow(grid.values, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(grid.shape[1]), [f"{d:g}" for d in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(int(n)) for n in grid.index])
        for (i, k), v in np.ndenumerate(grid.values):
            if not np.isnan(v):
                ax.text(k, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.5 else "white")
        ax.set_title(f"{model} · {method} · {setting}", fontsize=9)
        ax.set_xlabel("key depth (fraction of the filler)")
        ax.set_ylabel("prompt length (tokens)")
    for ax in axes[len(groups):]:
        ax.remove()
    fig.colorbar(image, ax=axes[:len(groups)].tolist(), label="retrieval accuracy (fraction)")
    fig.suptitle("Passkey retrieval by prompt length and key depth")
    return fig, len(groups)


def kv_memory_figure(df: pd.DataFrame) -> tuple[Figure, int] | None:
    """Per model: KV bytes held vs packed, and peak memory, for every method and setting."""
    ok = df[(df["status"] == "ok") & df["target"].isin(["fp16", "KV", "KV-evict"])]
    for c in ("length", "depth", "layer"):
        if c in ok:
            ok = ok[ok[c].isna()]
    if "kv_bytes_held" not in ok:
        return None
    ok = ok[ok["kv_bytes_held"].notna()]
    if ok.empty:
        return None
    models = sorted(ok["model"].unique())
    fig = Figure(figsize=(max(6.0, 1.0 + 0.9 * ok.groupby(["method", "setting"]).ngroups), 4.2 * len(models)),
                 layout="constrained")
    axes = fig.subplots(2 * len(models), 1, squeeze=False)[:, 0]
    for i, model in enumerate(models):
        m = ok[ok["model"] == model]
        task = m.groupby("task")["setting"].nunique().idxmax()  # the task that saw the most settings
        m = m[m["task"] == task]
        per = m.groupby(["method", "setting"])[["kv_bytes_held", "kv_bytes_packed", "peak_memory_bytes"]].mean()
        labels = [f"{meth}\n{s}" for meth, s in per.index]
        x = np.arange(len(per))
        ax = axes[2 * i]
        ax.bar(x - 0.2, per["kv_bytes_held"] / MIB, 0.4, label="held (measured)")
        ax.bar(x + 0.2, per["kv_bytes_packed"] / MIB, 0.4, label="packed layout (formula)")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("KV cache (MiB)")
        ax.set_xlabel("method and setting")
        ax.set_title(f"{model} on {task}: KV bytes held vs packed")
        ax.legend(fontsize="small")
        ax = axes[2 * i + 1]
        kind = m["peak_memory_kind"].dropna().iloc[0] if "peak_memory_kind" in m and m["peak_memory_kind"].notna().any() else "peak"
        ax.bar(x, per["peak_memory_bytes"] / MIB, 0.5, color="tab:gray")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel(f"peak memory (MiB, {kind})")
        ax.set_xlabel("method and setting")
        ax.set_title(f"{model} on {task}: peak memory")
    fig.suptitle("KV-cache bytes and memory per method")
    return fig, 2 * len(models)


def read_bench(bench_dir: Path) -> pd.DataFrame:
    """Rows with a batch size from every ``bench/*.json`` (one file per device, sections of rows)."""
    rows = []
    for path in sorted(Path(bench_dir).glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        device = report.get("device", path.stem) if isinstance(report, dict) else path.stem
        sections = report.items() if isinstance(report, dict) else [("rows", report)]
        for section, value in sections:
            if isinstance(value, list):
                for r in value:
                    if isinstance(r, dict) and ("batch" in r or "batch_size" in r):
                        rows.append({"device": device, "section": section,
                                     "batch": r.get("batch", r.get("batch_size")), **r})
    return pd.DataFrame(rows)


def bench_figure(bench: pd.DataFrame) -> tuple[Figure, int] | None:
    if bench.empty:
        return None
    tput = next((c for c in ("decode_tokens_per_s", "tokens_per_s") if c in bench), None)
    if tput is None or "peak_memory_bytes" not in bench:
        return None
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_t, ax_m = fig.subplots(1, 2)
    name = "config" if "config" in bench else "section"
    for (device, label), g in bench.groupby(["device", name]):
        g = g.groupby("batch")[[tput, "peak_memory_bytes"]].mean().sort_index()
        ax_t.plot(g.index, g[tput], marker="o", label=f"{label} ({device})")
        ax_m.plot(g.index, g["peak_memory_bytes"] / 2**30, marker="o", label=f"{label} ({device})")
    ax_t.set_xlabel("batch size (sequences)")
    ax_t.set_ylabel("throughput (tokens/s)")
    ax_t.set_title("Decode throughput against batch size")
    ax_m.set_xlabel("batch size (sequences)")
    ax_m.set_ylabel("peak memory (GiB)")
    ax_m.set_title("Peak memory against batch size")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Kernel benchmark")
    return fig, 2


def build_figures(df: pd.DataFrame, bench_dir: Path | None = None) -> list[tuple[str, Figure, int]]:
    """Every figure the rows support, as (file stem, figure, number of data panels)."""
    built = []
    h = headline(df) if not df.empty else df
    if not h.empty:
        for task, g in sorted(h.groupby("task"), key=lambda kv: kv[0]):
            safe = task.replace("/", "_").replace(",", "_")
            built += [(f"bits_{safe}", *f)] if (f := bits_figure(g, task)) else []
            built += [(f"budget_{safe}", *f)] if (f := budget_figure(g, task)) else []
    if not df.empty:
        built += [("passkey_heatmap", *f)] if (f := passkey_heatmap(df)) else []
        built += [("kv_memory", *f)] if (f := kv_memory_figure(df)) else []
    if bench_dir is not None and (f := bench_figure(read_bench(bench_dir))):
        built.append(("bench", *f))
    return built


def write_figures(df: pd.DataFrame, out_dir: Path, bench_dir: Path | None = None) -> list[dict]:
    """Write every figure as PNG and PDF; returns one record per figure (name, files, panels)."""
    return [_save(fig, out_dir, name, panels) for name, fig, panels in build_figures(df, bench_dir)]
