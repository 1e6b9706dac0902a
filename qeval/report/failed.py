"""Failed runs: one line per run whose status is ``failed`` (or ``interrupted``: stopped by a
signal), never a crash of the report.

A failed run is named by its model, method, setting and task(s), by the knobs that tell it apart
from the other runs of the same (model, method, setting) (the rule of :mod:`qeval.report.cells`),
by the first line of its error and by its run directory.
"""

from __future__ import annotations

import pandas as pd

from qeval.report.cells import knob_columns, row_knobs
from qeval.report.escape import cut, md
from qeval.report.style import missing

COLUMNS = ["model", "method", "setting", "task", "knobs", "error", "run_dir"]
ERROR_CHARS = 300
NOT_OK = ("failed", "interrupted")   # a cell stopped by a signal is listed too; its error says so


def _text(x) -> str:
    return "–" if missing(x) else str(x)


def first_line(error) -> str:
    """The first line of an error, cut to :data:`ERROR_CHARS` (an error may hold a whole log)."""
    text = _text(error)[:100 * ERROR_CHARS].strip()
    return cut(text.splitlines()[0], ERROR_CHARS) if text else "–"


def one_per_run(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop_duplicates("run_dir") if "run_dir" in df else df


def identifying_knobs(run: pd.Series, runs: pd.DataFrame) -> str:
    """``k=v`` of the knobs that differ between this run and the others of its (model, method,
    setting); an en dash when it is the only one."""
    same = pd.Series(True, index=runs.index)
    for c in ("model", "method", "setting"):   # as text, so that None and NaN compare equal
        same &= runs[c].astype(str) == str(run[c])
    peers = runs[same]
    columns = knob_columns(runs, set(str(run["task"]).split(",")))
    mine = dict(row_knobs(run, columns))
    seen: dict[str, set] = {}
    for _, peer in peers.iterrows():
        for k, v in row_knobs(peer, columns):
            seen.setdefault(k, set()).add(repr(v))
    varying = [k for k, vs in seen.items() if len(vs) > 1]
    return ", ".join(f"{k}={cut(mine.get(k))}" for k in varying) or "–"


def failed_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One line per failed run, in the columns of :data:`COLUMNS` (display text)."""
    if df.empty or "status" not in df:
        return pd.DataFrame(columns=COLUMNS)
    runs = one_per_run(df)
    failed = runs[runs["status"].isin(NOT_OK)]
    lines = [{"model": _text(r["model"]), "method": _text(r["method"]), "setting": _text(r["setting"]),
              "task": _text(r["task"]), "knobs": identifying_knobs(r, runs),
              "error": first_line(r.get("error")), "run_dir": _text(r.get("run_dir"))}
             for _, r in failed.iterrows()]
    return pd.DataFrame(lines, columns=COLUMNS)


def failed_markdown(failed: pd.DataFrame) -> str:
    if failed.empty:
        return "### Failed runs\n\nNone.\n"
    lines = [f"### Failed runs ({len(failed)})", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join(["---"] * len(COLUMNS)) + "|"]
    # an error message may hold a pipe, a name anything (:func:`qeval.report.escape.md`)
    lines += ["| " + " | ".join(md(r[c]) for c in COLUMNS) + " |" for _, r in failed.iterrows()]
    return "\n".join(lines) + "\n"
