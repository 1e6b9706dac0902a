"""``python -m qeval.report [results-dir] [--out DIR]``: rows -> Parquet/CSV, tables, figures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from qeval.report.figures import write_figures
from qeval.report.gather import gather, write_table
from qeval.report.tables import write_tables


def report(results_dir: Path, out: Path | None = None) -> dict:
    """Write everything for one results directory; returns what was written."""
    results_dir = Path(results_dir)
    out = Path(out) if out else results_dir / "report"
    df = gather(results_dir)
    if df.empty:  # not even a failed run
        raise SystemExit(f"qeval.report: no finished runs under {results_dir / 'runs'}")
    written = {"rows": [str(p) for p in write_table(df, out)],
               "tables": [str(p) for p in write_tables(df, out / "tables")],
               "figures": write_figures(df, out / "figures", results_dir / "bench")}
    (out / "manifest.json").write_text(json.dumps(written, indent=2))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qeval.report", description=__doc__.splitlines()[0])
    ap.add_argument("results_dir", nargs="?", default="results", type=Path,
                    help="a results directory (holds runs/<config_hash>/; default: results)")
    ap.add_argument("--out", type=Path, default=None, help="where to write (default: <results_dir>/report)")
    args = ap.parse_args(argv)
    written = report(args.results_dir, args.out)
    n_rows = len(pd.read_csv(written["rows"][1], usecols=[0]))
    print(f"qeval.report: {n_rows} rows -> {written['rows'][0]}, {written['rows'][1]}")
    tables = Path(written["tables"][-1]).parent
    print(f"qeval.report: {len(written['tables'])} table files -> {tables}")
    failed = (tables / "failed.md").read_text().splitlines()[0]
    if failed != "### Failed runs":
        print(f"qeval.report: {failed.removeprefix('### ')} -> {tables / 'failed.md'}")
    for f in written["figures"]:
        print(f"qeval.report: figure {f['name']} ({f['panels']} panels) -> {f['png']}, {f['pdf']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
