"""The rows of one finished run, read as :func:`qeval.results.read_rows` reads them, but without
ever hanging, exhausting memory or trusting a row:

* whether the run is finished and its files agree is :func:`qeval.results.read_finished`'s call
  (result.json sealed, rows.jsonl and config.yaml the ones it recorded; a FIFO or directory in
  their place is named, never waited on); before it, each file must be a regular file of at most
  :data:`~qeval.report.safe_read.ROWS_BYTES`, so nothing huge is read;
* rows.jsonl is then read once more through :mod:`qeval.report.safe_read` (capped, non-blocking)
  and checked against the checksum result.json recorded, so the text used is the text checked;
* every line is parsed on its own and checked against :mod:`qeval.report.schema`; a line that is
  not JSON or does not fit is named in :class:`~qeval.report.skips.Skips` and left out, the others
  are kept.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from qeval import results
from qeval.report import schema
from qeval.report.safe_read import PARSE_ERRORS, ROWS_BYTES, Refused, read_text
from qeval.report.skips import Skips

RUN_FILES = ("result.json", "rows.jsonl", "config.yaml")


def too_large(run_dir: Path) -> str | None:
    """Which of a run's files is a regular file larger than the report reads (None: none is)."""
    for name in RUN_FILES:
        try:
            st = os.lstat(run_dir / name)
        except OSError:
            continue   # missing: read_finished says what that means
        if stat.S_ISREG(st.st_mode) and st.st_size > ROWS_BYTES:
            return f"{run_dir / name}: {st.st_size} bytes, more than the {ROWS_BYTES} read"
    return None


def finished_text(run_dir: Path) -> str | None:
    """rows.jsonl's text of a finished run whose files agree; None while it is unfinished;
    :class:`Refused` (naming the file and what is wrong) otherwise."""
    if problem := too_large(run_dir):
        raise Refused(problem)
    try:
        result, problem = results.read_finished(run_dir)
    except PARSE_ERRORS as e:   # a result.json nested beyond what json.loads takes
        raise Refused(f"{run_dir / 'result.json'}: not JSON ({type(e).__name__})") from None
    if problem:
        raise Refused(problem)
    if result is None:
        return None
    text = read_text(run_dir / "rows.jsonl", ROWS_BYTES)
    if "rows_sha256" in result and results.digest(text) != result["rows_sha256"]:
        raise Refused(f"{run_dir / 'rows.jsonl'} changed while it was read")
    return text


def read_rows(run_dir: Path, skips: Skips) -> list[dict]:
    """The rows of a finished run that fit the schema ([] while it is unfinished, and when its
    files are refused, which ``skips`` names)."""
    if not os.path.lexists(run_dir / "result.json"):
        return []   # still being written (result.json comes last)
    try:
        text = finished_text(run_dir)
    except Refused as e:
        skips.add_file(run_dir, str(e))
        return []
    path = run_dir / "rows.jsonl"
    rows = []
    for number, line in enumerate((text or "").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "\\ud" in line or "\\uD" in line:   # a lone surrogate cannot be written as UTF-8
                row = schema.without_surrogates(row)
        except PARSE_ERRORS as e:
            skips.add_row(path, number, "-", f"not JSON ({type(e).__name__})")
            continue
        problem = schema.row_problem(row)
        if problem:
            skips.add_row(path, number, *problem)
            continue
        rows.append(schema.normalised(row))
    return rows
