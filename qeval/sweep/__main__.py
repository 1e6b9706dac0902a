"""``python -m qeval.sweep <sweep dir>``: where a sweep stands (useful while a SLURM array runs)."""

from __future__ import annotations

import sys
from pathlib import Path

from qeval.report.escape import cut, printable
from qeval.sweep.summary import MARKER_DIR, read_total, summarize, summary_line

ERROR_CHARS = 300   # a failed cell's error as printed here; sweep_summary.json keeps it whole


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m qeval.sweep <sweep dir>  (the hydra.sweep.dir of a multirun)", file=sys.stderr)
        return 2
    sweep_dir = Path(argv[0])
    if not (sweep_dir / MARKER_DIR).is_dir():
        print(f"qeval.sweep: {printable(sweep_dir)} is not a qeval sweep directory (no {MARKER_DIR}/)",
              file=sys.stderr)
        return 2
    s = summarize(sweep_dir, read_total(sweep_dir))
    print(summary_line(s).replace("no report", "not finished or killed"))
    for cell in s["failed_cells"]:
        # names and errors come from files anyone may write: one line each, no control characters
        print(f"  failed cell {cell['job']} ({cut(' '.join(cell['overrides']), ERROR_CHARS)}): "
              f"{cut(cell['error'], ERROR_CHARS)}")
    for skipped in s["skipped_markers"]:
        print(f"  skipped marker {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
