"""``python -m qeval.report [results-dir] [--out DIR]``: rows -> Parquet/CSV, tables, figures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qeval.report.escape import printable
from qeval.report.figures import write_figures
from qeval.report.gather import gather, write_table
from qeval.report.skips import Skips
from qeval.report.tables import write_tables


def report(results_dir: Path, out: Path | None = None, skips: Skips | None = None) -> dict:
    """Write everything for one results directory; returns what was written (and, under
    ``skipped``, the rows and files left out: :class:`qeval.report.skips.Skips`). An ``out`` that
    cannot be written raises OSError before anything is written."""
    results_dir = Path(results_dir)
    out = Path(out) if out else results_dir / "report"
    skips = Skips() if skips is None else skips
    df = gather(results_dir, skips)
    if df.empty:  # not even a failed run
        raise SystemExit(f"qeval.report: no finished runs under {printable(results_dir / 'runs')}"
                         + (f" (skipped {skips.rows} rows and {skips.files} files)" if skips else ""))
    out.mkdir(parents=True, exist_ok=True)   # NotADirectoryError under a file, PermissionError, ...
    written = {"rows": [str(p) for p in write_table(df, out)],
               "tables": [str(p) for p in write_tables(df, out / "tables")],
               "figures": write_figures(df, out / "figures", results_dir / "bench"),
               "rows_count": len(df), "skipped": skips.as_json()}
    (out / "manifest.json").write_text(json.dumps(written, indent=2))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qeval.report", description=__doc__.splitlines()[0])
    ap.add_argument("results_dir", nargs="?", default="results", type=Path,
                    help="a results directory (holds runs/<config_hash>/; default: results)")
    ap.add_argument("--out", type=Path, default=None, help="where to write (default: <results_dir>/report)")
    args = ap.parse_args(argv)
    skips = Skips()
    try:
        written = report(args.results_dir, args.out, skips)
    except OSError as e:   # where it writes: a folder under a file, no permission, a full disk
        where = f"{printable(e.filename)}: " if e.filename else ""
        print(f"qeval.report: error: cannot write the report: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    say = lambda line: print(printable(line))
    say(f"qeval.report: {written['rows_count']} rows -> {written['rows'][0]}, {written['rows'][1]}")
    tables = Path(written["tables"][-1]).parent
    say(f"qeval.report: {len(written['tables'])} table files -> {tables}")
    failed = (tables / "failed.md").read_text().splitlines()[0]
    if failed != "### Failed runs":
        say(f"qeval.report: {failed.removeprefix('### ')} -> {tables / 'failed.md'}")
    for f in written["figures"]:
        say(f"qeval.report: figure {f['name']} ({f['panels']} panels) -> {f['png']}, {f['pdf']}")
    for line in skips.summary():
        say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
