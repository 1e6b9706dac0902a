"""What a run says, through ``logging``: Hydra configures it per job (qeval/configs/hydra/
job_logging/qeval.yaml: plain lines on the console, stamped ones in the job's log file), so a
cluster job's log holds what the console shows.

Progress (documents scored, tokens decoded) is a tqdm bar on a terminal; when stdout is not one
(a SLURM job, a redirected run) tqdm would stay silent for hours, so a :class:`Progress` writes a
log line every ``QEVAL_PROGRESS_SECONDS`` (default 30) instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

log = logging.getLogger("qeval")


class BelowWarning(logging.Filter):
    """Keeps warnings and errors off stdout (they go to stderr)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def progress_interval() -> float:
    """Seconds between progress lines in a log (``QEVAL_PROGRESS_SECONDS``)."""
    raw = os.environ.get("QEVAL_PROGRESS_SECONDS", "30")
    try:
        return max(float(raw), 0.0)
    except ValueError:
        return 30.0


class Progress:
    """Counts ``total`` units of work. On a terminal it is a tqdm bar; otherwise a log line
    ``<desc>: done/total (pct), rate/s, about N s left[, detail()]`` at most every
    ``progress_interval()`` seconds, and one when the work is done."""

    def __init__(self, total: int, desc: str, unit: str = "sample", detail: Callable[[], str] | None = None,
                 terminal: bool | None = None):
        self.total, self.desc, self.unit, self.detail = total, desc, unit, detail
        self.done = 0
        self.start = self.last = time.monotonic()
        self.every = progress_interval()
        self.bar = None
        if sys.stdout.isatty() if terminal is None else terminal:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            log.info(self.line(now))

    def line(self, now: float) -> str:
        spent = max(now - self.start, 1e-9)
        rate = self.done / spent
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = f", about {(self.total - self.done) / rate:.0f} s left" if rate and self.done < self.total else ""
        extra = f", {self.detail()}" if self.detail else ""
        return f"{self.desc}: {self.done}/{self.total} {self.unit}s{pct}, {rate:.3g}/s{left}{extra}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            log.info(self.line(time.monotonic()))
