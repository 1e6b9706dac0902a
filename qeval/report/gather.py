"""Gather every row of a results directory into one table.

A run directory (``runs/<config_hash>/``) counts once its ``result.json`` exists: that file is
written last and atomically by :func:`qeval.results.write_run`, so its ``rows.jsonl`` is complete.
A run still in progress (no ``result.json`` yet) is left out rather than read half-way.

Derived columns added here (never parsed from directory names; only from the row's own knobs):

* ``target``: ``fp16`` (nothing quantized), ``W``, ``WA``, ``KV`` or ``KV-evict`` (H2O-style
  eviction at 16 bits), ``mixed`` otherwise.
* ``bits``: the bit width on the row's target axis (weights for W/WA, K/V for KV; 16 for fp16).
* ``setting``: a short label such as ``W4A8``, ``KV2`` or ``KV 20%`` for tables and legends.
* ``kv_budget``: the fraction of the prompt an evicting method keeps (heavy + recent ratios).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from qeval import results

# rows whose value is a headline number of a task (no per-cell or per-layer breakdown)
BREAKDOWN_COLUMNS = results.DETAIL_COLUMNS
# a task's headline metric: the first of these present, else the first in alphabetical order
METRIC_PREFERENCE = ("accuracy", "exact_match,strict-match", "exact_match,flexible-extract",
                     "acc,none", "acc_norm,none", "score,none", "exact_match,get-answer")


def read_run(run_dir: Path) -> list[dict]:
    """Rows of one finished run (empty while the run is still being written)."""
    if not (run_dir / "result.json").is_file():
        return []
    rows = []
    with open(run_dir / "rows.jsonl") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                row.pop("config", None)  # nested; the run's config.yaml holds it in full
                row["run_dir"] = str(run_dir)
                rows.append(row)
    return rows


def _target(r) -> str:
    w, a, k, v = (r.get(c) for c in ("w_bits", "a_bits", "k_bits", "v_bits"))
    k = k if pd.notna(k) else r.get("kv_bits")
    v = v if pd.notna(v) else r.get("kv_bits")
    q = {name: b for name, b in (("W", w), ("A", a), ("K", k), ("V", v)) if pd.notna(b) and b < 16}
    if not q:
        return "KV-evict" if pd.notna(r.get("kv_budget")) and r["kv_budget"] < 1 else "fp16"
    if set(q) == {"W"}:
        return "W"
    if set(q) <= {"W", "A"} and "A" in q:
        return "WA"
    if set(q) <= {"K", "V"}:
        return "KV"
    return "mixed"


def _setting(r) -> str:
    t = r["target"]
    if t == "W":
        return f"W{int(r['w_bits'])}"
    if t == "WA":
        return f"W{int(r['w_bits'])}A{int(r['a_bits'])}"
    if t == "KV":
        k, v = r.get("k_bits"), r.get("v_bits")
        if pd.notna(k) and pd.notna(v) and k != v:
            return f"K{int(k)}V{int(v)}"
        return f"KV{int(r['kv_bits'])}"
    if t == "KV-evict":
        return f"KV {r['kv_budget']:.0%}"
    if t == "fp16":
        return "fp16"
    return f"W{int(r['w_bits'])}A{int(r['a_bits'])}KV{int(r['kv_bits'])}"


def _bits(r) -> float:
    return {"W": r["w_bits"], "WA": r["w_bits"], "KV": r["kv_bits"]}.get(r["target"], 16)


def add_derived(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    df = df.copy()
    if "method.heavy_ratio" in df:
        heavy = pd.to_numeric(df["method.heavy_ratio"], errors="coerce")
        recent = pd.to_numeric(df.get("method.recent_ratio"), errors="coerce")
        df["kv_budget"] = heavy + recent.fillna(0)
        df.loc[df["method"] != "h2o", "kv_budget"] = float("nan")
    else:
        df["kv_budget"] = float("nan")
    for c in ("k_bits", "v_bits"):
        if c not in df:
            df[c] = df["kv_bits"]
    df["target"] = df.apply(_target, axis=1)
    df["setting"] = df.apply(_setting, axis=1)
    df["bits"] = df.apply(_bits, axis=1)
    return df


def gather(results_dir: Path) -> pd.DataFrame:
    """Every row of every finished run under ``results_dir/runs``, with derived columns."""
    runs = Path(results_dir) / "runs"
    rows = [r for d in sorted(runs.glob("*")) if d.is_dir() for r in read_run(d)]
    return add_derived(pd.DataFrame(rows))


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """One number per (run, task): the overall value of the task's headline metric."""
    if df.empty:
        return df
    ok = df[df["status"] == "ok"]
    for c in BREAKDOWN_COLUMNS:
        if c in ok:
            ok = ok[ok[c].isna()]
    if "subtask" in ok:  # lm-eval: the task's own (group) row, not its subtasks
        ok = ok[ok["subtask"].isna() | (ok["subtask"] == ok["task"])]
    ok = ok[ok["value"].notna()]
    keep = []
    for task, g in ok.groupby("task"):
        present = set(g["metric"])
        metric = next((m for m in METRIC_PREFERENCE if m in present), sorted(present)[0])
        keep.append(g[g["metric"] == metric])
    return pd.concat(keep) if keep else ok.iloc[0:0]


def baseline_of(df: pd.DataFrame) -> pd.DataFrame:
    """Full-precision value per (model, task, metric): the mean over fp16 runs (any method at 16
    bits is an exact identity, so they agree up to nondeterminism)."""
    fp = df[df["target"] == "fp16"]
    return fp.groupby(["model", "task", "metric"], as_index=False)["value"].mean().rename(
        columns={"value": "fp16_value"})


def write_table(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """All rows as Parquet and CSV (columns of mixed types are stored as text in Parquet)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, parquet = out_dir / "rows.csv", out_dir / "rows.parquet"
    df.to_csv(csv, index=False)
    pq = df.copy()
    for c in pq.columns:
        if pq[c].dtype == object and pq[c].map(type).nunique() > 1:
            pq[c] = pq[c].map(lambda x: None if x is None or (isinstance(x, float) and pd.isna(x)) else str(x))
    pq.to_parquet(parquet, index=False)
    return [parquet, csv]
