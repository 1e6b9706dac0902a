"""What the report left out, said as it happens and once more at the end.

Each row or file the report cannot use is named on stderr with one warning line (file, line,
key, why). A damaged file can hold a million bad lines, so at most :data:`WARNINGS_PER_FILE` lines
are printed and kept per file; the count covers them all.
"""

from __future__ import annotations

import sys

from qeval.report.escape import printable

WARNINGS_PER_FILE = 10
SHOWN_AT_END = 20


class Skips:
    """Rows and files left out of a report: a count and the first few of each file, named."""

    def __init__(self, quiet: bool = False):
        self.rows = 0            # rows skipped
        self.files = 0           # files refused (a run's rows.jsonl counts here and for its rows)
        self.items: list[str] = []
        self._per_file: dict[str, int] = {}
        self.quiet = quiet

    def add_row(self, path, line: int, key: str, why: str) -> None:
        """Row ``line`` of ``path`` left out: its ``key`` does not fit (``-``: the whole row)."""
        self.rows += 1
        where = f"{path}:{line}" + (f": key {key!r}" if key != "-" else "")
        self._note(str(path), f"{where}: {why}")

    def add_file(self, path, why: str) -> None:
        """A whole file left out (a run's rows that cannot be read, a config that is refused)."""
        self.files += 1
        self._note(str(path), why if str(path) in why else f"{path}: {why}")

    def _note(self, file: str, text: str) -> None:
        seen = self._per_file[file] = self._per_file.get(file, 0) + 1
        if seen <= WARNINGS_PER_FILE:
            self.items.append(printable(text))
            self.warn(f"qeval.report: warning: skipped {printable(text)}")
        elif seen == WARNINGS_PER_FILE + 1:
            self.items.append(f"{printable(file)}: more skipped (only the first {WARNINGS_PER_FILE} are named)")
            self.warn(f"qeval.report: warning: more of {printable(file)} skipped; not named one by one")

    def warn(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def __bool__(self) -> bool:
        return bool(self.items)

    def summary(self) -> list[str]:
        """The closing lines: how many rows and files were skipped, and where."""
        if not self:
            return []
        head = (f"qeval.report: skipped {self.rows} row{'s' * (self.rows != 1)} and "
                f"{self.files} file{'s' * (self.files != 1)} that do not fit (named above):")
        lines = [head]
        lines += [f"qeval.report:   {item}" for item in self.items[:SHOWN_AT_END]]
        if len(self.items) > SHOWN_AT_END:
            lines.append(f"qeval.report:   ... {len(self.items) - SHOWN_AT_END} more in manifest.json")
        return lines

    def as_json(self) -> dict:
        return {"rows": self.rows, "files": self.files, "items": self.items}
