"""The kernel benchmark figure: decode throughput and peak memory against batch size, from the
JSON files ``scripts/bench_*.py`` write under ``results/bench/`` (one file per device)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from qeval.report.escape import LABEL_CHARS, cut, figure_text
from qeval.report.safe_read import SMALL_BYTES, Refused, read_json


def read_bench(bench_dir: Path) -> pd.DataFrame:
    """Rows with a batch size from every ``bench/*.json`` (one file per device, sections of rows)."""
    rows = []
    for path in sorted(Path(bench_dir).glob("*.json")):
        try:   # a regular file of at most SMALL_BYTES: a FIFO or a huge file is not read
            report = read_json(path, SMALL_BYTES)
        except Refused:
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
    name = "config" if "config" in bench else "section"
    # a hand-edited file may hold anything: names as text, numbers as numbers or missing
    bench = bench.assign(device=bench["device"].map(str), **{name: bench[name].map(str)},
                         **{c: pd.to_numeric(bench[c], errors="coerce") for c in ("batch", tput, "peak_memory_bytes")})
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_t, ax_m = fig.subplots(1, 2)
    for (device, label), g in bench.groupby(["device", name]):
        g = g.groupby("batch")[[tput, "peak_memory_bytes"]].mean().sort_index()
        name_shown = figure_text(f"{cut(label)} ({cut(device)})", 3 * LABEL_CHARS)
        ax_t.plot(g.index, g[tput], marker="o", label=name_shown)
        ax_m.plot(g.index, g["peak_memory_bytes"] / 2**30, marker="o", label=name_shown)
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
