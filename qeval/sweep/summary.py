"""Markers and summaries: each finished cell of a sweep leaves one small JSON marker under
``<sweep dir>/.qeval_cells/`` (its status, overrides, error, run directory); a sweep's summary and
its closing comparison table are read back from those markers.

Markers are files, not shared memory, because the submitit launchers run cells in separate
processes (or on separate machines sharing a file system). So a sweep folder may hold anything:
markers and the rows they point to are read as the report reads runs (regular files only, size
caps, never blocking: :mod:`qeval.report.safe_read`), and a marker that is not one
:func:`record` writes is named in the summary and skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qeval import results
from qeval.report.escape import cut, printable
from qeval.report.safe_read import (
    ROWS_BYTES,
    SMALL_BYTES,
    Refused,
    read_json,
    read_text,
)

MARKER_DIR = ".qeval_cells"
STATUSES = ("done", "skipped", "failed")
LABEL = 160   # characters of a cell's label in the comparison table (its overrides)


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
    """The sweep's cell count; None when unknown (not written, or not a count)."""
    try:
        total = read_json(sweep_dir / MARKER_DIR / "total", SMALL_BYTES)
    except Refused:
        return None
    return total if isinstance(total, int) and not isinstance(total, bool) and total >= 0 else None


def marker_problem(m) -> str | None:
    """Why a marker is not one :func:`record` writes (None when it is): a JSON object with an
    integer ``job``, a ``status`` of :data:`STATUSES`, ``overrides`` a list of text, and ``error``
    and ``run_dir`` text or null."""
    if not isinstance(m, dict):
        return f"not a JSON object but {type(m).__name__}"
    if not isinstance(m.get("job"), int) or isinstance(m["job"], bool):
        return "key 'job': must be an integer"
    if m.get("status") not in STATUSES:
        return f"key 'status': must be one of {', '.join(STATUSES)}"
    if not isinstance(m.get("overrides"), list) or not all(isinstance(o, str) for o in m["overrides"]):
        return "key 'overrides': must be a list of text"
    for key in ("error", "run_dir"):
        if m.get(key) is not None and not isinstance(m[key], str):
            return f"key {key!r}: must be text or null"
    return None


def read_markers_checked(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """(markers, what was skipped): every marker that fits :func:`marker_problem`, and one line
    per marker file that does not (not a regular file, too large, not JSON, wrong types)."""
    out, skipped = [], []
    for p in sorted((sweep_dir / MARKER_DIR).glob("*.json")):
        try:   # regular files of at most SMALL_BYTES only: a FIFO is never waited on
            m = read_json(p, SMALL_BYTES)
        except Refused as e:
            skipped.append(printable(str(e)))
            continue
        if problem := marker_problem(m):
            skipped.append(printable(f"{p}: {problem}"))
            continue
        out.append(m)
    return out, skipped


def read_markers(sweep_dir: Path) -> list[dict]:
    """Every marker that fits (a marker is written atomically; one that does not fit is someone
    else's file, named by :func:`summarize`)."""
    return read_markers_checked(sweep_dir)[0]


def summarize(sweep_dir: Path, total: int | None) -> dict:
    markers, skipped = read_markers_checked(sweep_dir)
    counts = {s: sum(m["status"] == s for m in markers) for s in STATUSES}
    summary = {"sweep_dir": str(sweep_dir), "cells": total, **counts,
               "missing": None if total is None else max(0, total - len(markers)),
               "failed_cells": [{"job": m["job"], "overrides": m["overrides"], "error": m.get("error")}
                                for m in markers if m["status"] == "failed"],
               "skipped_markers": skipped}
    return summary


def summary_line(s: dict) -> str:
    line = (f"qeval sweep: {s['cells'] if s['cells'] is not None else '?'} cells: "
            f"done {s['done']}, skipped {s['skipped']}, failed {s['failed']}")
    if s.get("missing"):
        line += f", no report {s['missing']} (killed? rerun the sweep to redo them)"
    if s.get("skipped_markers"):
        line += f", {len(s['skipped_markers'])} marker files skipped (not qeval's markers)"
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
        label = cut(" ".join(o for o in m["overrides"] if o.partition("=")[0] in varying) or "(defaults)", LABEL)
        rows += [{"cell": label, "job": m["job"], "task": r["task"], "metric": r["metric"], "value": r["value"],
                  **{k: cut(v) if isinstance(v, str) else v for k, v in r.items()
                     if _is_knob(k) and isinstance(v, (str, int, float, bool))}}
                 for r in headline_rows(Path(m["run_dir"]))]
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


def headline_rows(run_dir: Path) -> list[dict]:
    """The ok headline rows of a run whose task, metric and value are what a table can show;
    a rows.jsonl that cannot be read (a FIFO, too large) and lines that are not such rows give none."""
    try:
        lines = read_text(run_dir / "rows.jsonl", ROWS_BYTES).split("\n")
    except Refused:
        return []
    out = []
    for line in lines:
        try:
            r = json.loads(line) if line.strip() else None
        except (ValueError, RecursionError):
            continue
        if (isinstance(r, dict) and r.get("status") == "ok" and results.is_headline(r)
                and isinstance(r.get("task"), str) and isinstance(r.get("metric"), str)
                and (r.get("value") is None or isinstance(r["value"], (int, float)) and not isinstance(r["value"], bool))):
            out.append(r)
    return out


# the row columns that say how a cell ran (shown when every cell shares them)
KNOBS = ("model", "method", "w_bits", "a_bits", "kv_bits", "k_bits", "v_bits", "w_format", "a_format",
         "kv_format", "kv_semantics", "dtype", "device", "kv_backend",
         "weight_method", "act_method", "kv_method", "evict_method", "transforms")


def _is_knob(key: str) -> bool:
    return key in KNOBS or key.startswith(("method.", "weight.", "act.", "kv.", "evict.", "transform."))
