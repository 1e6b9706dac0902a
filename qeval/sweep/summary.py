"""Markers and summaries: each finished cell of a sweep leaves one small JSON marker under
``<sweep dir>/.qeval_cells/`` (its status, overrides, error, run directory); a sweep's summary and
its closing comparison table are read back from those markers.

Markers are files, not shared memory, because the submitit launchers run cells in separate
processes (or on separate machines sharing a file system).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qeval import results

MARKER_DIR = ".qeval_cells"
STATUSES = ("done", "skipped", "failed")


def record(sweep_dir: Path, cell: dict) -> None:
    """Write one cell's marker (atomically) and print the sweep's progress."""
    job = int(cell["job"])
    results.write_atomic(sweep_dir / MARKER_DIR / f"{job:06d}.json", json.dumps(cell, default=str))
    total = read_total(sweep_dir)
    finished = len(read_markers(sweep_dir))
    # in the cell's own process: its log file gets the line too
    logging.getLogger("qeval.sweep").info(
        f"qeval sweep: cell {job} {cell['status']} ({' '.join(cell['overrides'])}) "
        f"[{finished}/{total if total is not None else '?'} finished]")


def read_total(sweep_dir: Path) -> int | None:
    try:
        return json.loads((sweep_dir / MARKER_DIR / "total").read_text())
    except (OSError, ValueError):
        return None


def read_markers(sweep_dir: Path) -> list[dict]:
    out = []
    for p in sorted((sweep_dir / MARKER_DIR).glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue  # a marker is written atomically; an unreadable one is someone else's file
    return out


def summarize(sweep_dir: Path, total: int | None) -> dict:
    markers = read_markers(sweep_dir)
    counts = {s: sum(m["status"] == s for m in markers) for s in STATUSES}
    summary = {"sweep_dir": str(sweep_dir), "cells": total, **counts,
               "missing": None if total is None else max(0, total - len(markers)),
               "failed_cells": [{"job": m["job"], "overrides": m["overrides"], "error": m["error"]}
                                for m in markers if m["status"] == "failed"]}
    return summary


def summary_line(s: dict) -> str:
    line = (f"qeval sweep: {s['cells'] if s['cells'] is not None else '?'} cells: "
            f"done {s['done']}, skipped {s['skipped']}, failed {s['failed']}")
    if s.get("missing"):
        line += f", no report {s['missing']} (killed? rerun the sweep to redo them)"
    return line


def comparison(markers: list[dict]) -> str:
    """The headline numbers of every finished cell side by side: one line per cell (its swept
    overrides), one column per (task, metric)."""
    import pandas as pd  # imported here: a cell's process never needs it

    # label a cell by the overrides that differ between cells, not the ones they all share
    values: dict[str, set] = {}
    for m in markers:
        for o in m["overrides"]:
            k, _, v = o.partition("=")
            values.setdefault(k, set()).add(v)
    varying = {k for k, vs in values.items() if len(vs) > 1}
    rows = []
    for m in markers:
        if m["status"] == "failed" or not m.get("run_dir"):
            continue
        label = " ".join(o for o in m["overrides"] if o.partition("=")[0] in varying) or "(defaults)"
        try:
            lines = (Path(m["run_dir"]) / "rows.jsonl").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            r = json.loads(line)
            if r.get("status") == "ok" and results.is_headline(r):
                rows.append({"cell": label, "job": m["job"], "task": r["task"], "metric": r["metric"],
                             "value": r["value"], **{k: r.get(k) for k in r if _is_knob(k)}})
    if not rows:
        return ""
    df = pd.DataFrame(rows)
    # what every cell shares, so the table says what it compares (a demo's quiet per-tensor KV too)
    shared = [f"{k}={df[k].iloc[0]}" for k in df.columns if _is_knob(k)
              and df[k].astype(str).nunique() == 1 and df[k].notna().all()]
    table = df.pivot_table(index=["job", "cell"], columns=["task", "metric"], values="value", aggfunc="first")
    table.index = table.index.droplevel("job")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        text = table.to_string(float_format=lambda x: f"{x:.3f}")
    return ("every cell: " + " ".join(shared) + "\n" if shared else "") + text


# the row columns that say how a cell ran (shown when every cell shares them)
KNOBS = ("model", "method", "w_bits", "a_bits", "kv_bits", "k_bits", "v_bits", "w_format", "a_format",
         "kv_format", "kv_semantics", "dtype", "device", "kv_backend")


def _is_knob(key: str) -> bool:
    return key in KNOBS or key.startswith("method.")
