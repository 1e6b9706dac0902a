"""Gather every row of a results directory into one table.

A run directory (``runs/<config_hash>/``) counts once its ``result.json`` exists: that file is
written last and atomically by :func:`qeval.results.write_run`, so its ``rows.jsonl`` is complete.
A run still in progress (no ``result.json`` yet) is left out rather than read half-way.

Nothing read is trusted (:mod:`qeval.report.runs`): files are read only when regular and under a
size cap, ``config.yaml`` with an alias budget (:mod:`qeval.report.safe_read`), and every row is
checked against the row schema (:mod:`qeval.report.schema`). What does not fit is named in a
:class:`~qeval.report.skips.Skips` (file, line, key, why) and left out; the report goes on.

Labels come from the rows themselves: every method writes ``target`` (``fp16``, ``W``, ``WA``,
``KV``, ``KV-evict`` for an eviction method, ``mixed``), ``setting`` (a short label such as
``W4A8``, ``KV2`` or ``KV 20%`` for tables and legends) and ``kv_budget`` (the fraction of the
prompt an evicting method keeps) with :meth:`qeval.recipe.recipe.Recipe.labels`, so nothing here
knows any method. Derived here: ``bits``, the bit width on the row's target axis (weights for
W/WA, K/V for KV; 16 for fp16). Nothing is ever parsed from directory names.

The run's resolved config (the nested ``config`` dict every row carries, else the run's
``config.yaml``) is flattened into ``config.<key>`` columns (lists as JSON text), minus the keys
that only say where or how a run was launched (:data:`qeval.results.NON_IDENTITY_KEYS`). Those
columns are the knobs :mod:`qeval.report.cells` groups by, so no two settings are ever averaged.

Numeric columns are made numeric here (a failed row may hold None or the text a user typed where
a number belongs; an infinite bit width, length or count is missing too, only a value may be
infinite); a failed row whose bits are not numbers is labelled ``?``, never guessed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from qeval import results
from qeval.methods.base import bit_labels
from qeval.quant import formats
from qeval.report import runs, safe_read, schema
from qeval.report.escape import csv_cell
from qeval.report.skips import Skips

# rows whose value is a headline number of a task (no per-cell or per-layer breakdown)
BREAKDOWN_COLUMNS = results.DETAIL_COLUMNS
CONFIG_PREFIX = "config."
# columns that hold numbers; anything else in them (None, a typo in a failed row) becomes NaN
NUMERIC_COLUMNS = ("value", "stderr", "n", "w_bits", "a_bits", "kv_bits", "k_bits", "v_bits", "kv_budget",
                   "length", "depth", "layer", "seconds", "tokens_per_s", "kv_bytes_held",
                   "kv_bytes_packed", "peak_memory_bytes")
# at most this many distinct columns in one report (real rows and configs make a few hundred)
MAX_COLUMNS = 5000
SCALARS = (str, int, float, bool, type(None))
CONTAINERS = (list, tuple, set, dict)
# columns every table and figure reads; a row written without them gets None
EXPECTED_COLUMNS = ("model", "method", "task", "metric", "value", "status", "dtype", "target", "setting",
                    "kv_budget", "w_bits", "a_bits", "kv_bits")
BITS = ("w_bits", "a_bits", "kv_bits")
# a task's headline metric: the first of these present, else the first in alphabetical order
# (perplexity before its nll; lm-eval's wikitext headlines word_perplexity, as lm-eval does)
METRIC_PREFERENCE = ("accuracy", "exact_match,strict-match", "exact_match,flexible-extract",
                     "acc,none", "acc_norm,none", "score,none", "exact_match,get-answer",
                     "perplexity", "word_perplexity,none")


def read_run(run_dir: Path, skips: Skips | None = None) -> list[dict]:
    """Rows of one finished run that fit the row schema (:mod:`qeval.report.schema`), each with
    the run's flattened config as ``config.<key>`` columns. Empty while the run is still being
    written; a run whose files do not agree, a row that does not fit and a config that is refused
    are named in ``skips`` (and on stderr) and left out."""
    skips = Skips() if skips is None else skips
    rows = runs.read_rows(run_dir, skips)
    from_file = None
    for row in rows:
        config = row.pop("config", None)  # nested; flattened below, config.yaml holds it in full
        if not isinstance(config, dict):
            from_file = config_of(run_dir, skips) if from_file is None else from_file
            config = from_file
        row.update(config_columns(config))
        row["run_dir"] = str(run_dir)
    return rows


def config_of(run_dir: Path, skips: Skips | None = None) -> dict:
    """The resolved config a run wrote beside its rows (for rows written without a ``config``);
    {} when there is none, and when it is refused (an alias bomb, a FIFO, too large or too
    deep), which ``skips`` names: its rows are kept, without knobs from it."""
    path = run_dir / "config.yaml"
    if not os.path.lexists(path):
        return {}
    try:
        loaded = safe_read.read_yaml(path)
    except safe_read.Refused as e:
        if skips is not None:
            skips.add_file(path, f"{e}; its rows are kept without its knobs")
        return {}
    if not isinstance(loaded, dict):
        return {}
    problem = schema.config_problem(loaded)
    if problem:
        if skips is not None:
            skips.add_file(path, f"{problem}; its rows are kept without its knobs")
        return {}
    return loaded


def config_columns(config: dict) -> dict:
    """``{"method": {"kv_granularity": "per_token"}}`` -> ``{"config.method.kv_granularity": ...}``,
    launch keys left out; a list (or any other non-scalar YAML may hold) becomes JSON text so that
    it can be compared and grouped."""
    ident = {k: v for k, v in config.items() if k not in results.NON_IDENTITY_KEYS}
    return {CONFIG_PREFIX + k: v if isinstance(v, SCALARS) else schema.plain(v) if isinstance(v, CONTAINERS) else str(v)
            for k, v in results.flatten(ident).items()}


def _int(x):
    return int(x) if pd.notna(x) else None


def _bit_labels(r) -> pd.Series:
    if any(pd.isna(r[c]) for c in BITS):   # a failed row with bits that are not numbers
        return pd.Series(["?", "?"], index=["target", "setting"])
    k = r["k_bits"] if pd.notna(r["k_bits"]) else r["kv_bits"]
    v = r["v_bits"] if pd.notna(r["v_bits"]) else r["kv_bits"]
    return pd.Series(bit_labels(_int(r["w_bits"]), _int(r["a_bits"]), _int(k), _int(v)),
                     index=["target", "setting"])


def _bits(r) -> float:
    """The row's position on a bits axis: its target's bits, a block format at its storage per
    element (mxfp4 4.25, nvfp4 4.5), so formats sit beside integer widths without overlapping."""
    bits, fmt = {"W": (r["w_bits"], r.get("w_format")), "WA": (r["w_bits"], r.get("w_format")),
                 "KV": (r["kv_bits"], r.get("kv_format"))}.get(r["target"], (16, None))
    return formats.FORMATS[fmt].bits_per_element(bits) if isinstance(fmt, str) and fmt in formats.FORMATS else bits


def add_derived(df: pd.DataFrame) -> pd.DataFrame:
    """Labels come from the rows (the method wrote them); rows written without them (a cell that
    failed before its method was built) get the labels their bits give."""
    if df.empty:
        return df
    df = df.copy()
    for c in EXPECTED_COLUMNS:
        if c not in df:
            df[c] = None
    for c in NUMERIC_COLUMNS:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
            if c != "value":   # a perplexity may overflow to inf; a bit width, length or count may not
                df[c] = df[c].replace([math.inf, -math.inf], math.nan)
    for c in ("k_bits", "v_bits"):
        if c not in df:
            df[c] = df["kv_bits"]
    df["target"] = df["target"].astype(object)
    df["setting"] = df["setting"].astype(object)
    missing = df["target"].isna()
    if missing.any():
        df.loc[missing, ["target", "setting"]] = df[missing].apply(_bit_labels, axis=1).values
    df["bits"] = pd.to_numeric(df.apply(_bits, axis=1), errors="coerce")
    return df


def gather(results_dir: Path, skips: Skips | None = None) -> pd.DataFrame:
    """Every row of every finished run under ``results_dir/runs``, with derived columns; what
    does not fit is named in ``skips``. At most :data:`MAX_COLUMNS` distinct columns: a row that
    would add more (a hostile file with a new key per row) is skipped."""
    skips = Skips() if skips is None else skips
    run_dirs = Path(results_dir) / "runs"
    rows, columns = [], set()
    for d in sorted(run_dirs.glob("*")):
        if not d.is_dir():
            continue
        for r in read_run(d, skips):
            new = r.keys() - columns
            if len(columns) + len(new) > MAX_COLUMNS:
                skips.add_row(Path(d) / "rows.jsonl", "?", "-", f"more than {MAX_COLUMNS} distinct columns")
                continue
            columns |= new
            rows.append(r)
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
        metric = next((m for m in METRIC_PREFERENCE if m in present), min(present))
        keep.append(g[g["metric"] == metric])
    return pd.concat(keep) if keep else ok.iloc[0:0]


def neutralised(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` for a CSV file: text cells (and column names) that a spreadsheet would run as a
    formula start with a quote (:func:`qeval.report.escape.csv_cell`); numbers stay numbers."""
    out = df.rename(columns=csv_cell)
    for c in out.columns:   # object and string columns; a number column holds no text
        if not (pd.api.types.is_numeric_dtype(out[c]) or pd.api.types.is_bool_dtype(out[c])):
            out[c] = out[c].map(csv_cell)
    return out


def write_table(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """All rows as Parquet and CSV (columns of mixed types are stored as text in Parquet; the
    CSV's text cells are neutralised against formula injection, the Parquet file holds them as
    they are)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, parquet = out_dir / "rows.csv", out_dir / "rows.parquet"
    neutralised(df).to_csv(csv, index=False)
    pq = df.copy()
    for c in pq.columns:
        if pq[c].dtype == object and pq[c].map(type).nunique() > 1:
            pq[c] = pq[c].map(lambda x: None if x is None or (isinstance(x, float) and pd.isna(x)) else str(x))
    pq.to_parquet(parquet, index=False)
    return [parquet, csv]
