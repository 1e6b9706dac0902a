"""The compact table a run shows at the end (through the run's log)."""

from __future__ import annotations

import pandas as pd

from qeval.results import is_headline

COLUMNS = ["model", "method", "w_bits", "a_bits", "kv_bits", "kv_semantics", "task", "metric",
           "length", "depth", "value", "n", "kv_bytes_held", "kv_bytes_packed", "seconds", "status"]


def rows_table(rows: list[dict], full: bool = False) -> str:
    """The headline rows as a plain-text table ("" for no rows)."""
    if not rows:
        return ""
    if not full:  # the headline numbers; per-cell, per-layer and per-subtask rows are in rows.jsonl
        rows = [r for r in rows if is_headline(r)] or rows
    df = pd.DataFrame(rows)
    cols = [c for c in COLUMNS if c in df and df[c].notna().any()]
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        return df[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}")
