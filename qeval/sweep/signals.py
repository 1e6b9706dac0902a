"""SIGINT and SIGTERM as a clean stop: a run ends with its cell recorded as ``interrupted`` and one
line instead of a traceback, and a sweep's parent stops its cells and still writes its summary.

Two ways of hearing a signal, each installed for a stretch of work:

* :func:`raising` (a run computing its cell): the first signal raises :class:`Interrupted` where
  the run is, so the run writes its ``interrupted`` row on the way out; later ones are only
  noted, so that row is written whole;
* :func:`noting` (a sweep's parent, a cell before and after its run): a signal is noted in
  :data:`received` and nothing is raised; the launcher and the callback look at it between steps.

In a SLURM cell SIGTERM stays submitit's (it bypasses it and requeues on USR2); a cell there is
stopped by SIGINT (``scancel --signal=INT``) or recorded as killed by the launcher.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

received: int | None = None   # the first SIGINT or SIGTERM this process got


class Interrupted(KeyboardInterrupt):
    """The run was stopped by ``signum``; ``run_dir`` is where its interrupted row was written."""

    def __init__(self, signum: int):
        super().__init__(name(signum))
        self.signum = signum
        self.run_dir: str | None = None


def name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_status(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def _stopping() -> list[int]:
    slurm_cell = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    return [signal.SIGINT] if slurm_cell else [signal.SIGINT, signal.SIGTERM]


def _note(signum, frame) -> None:
    global received
    received = received or signum


def _raise(signum, frame) -> None:
    global received
    if received is None:
        received = signum
        raise Interrupted(signum)


def _install(handler) -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}   # only the main thread may set handlers (and only it receives signals)
    old = {s: signal.getsignal(s) for s in _stopping()}
    for s in old:
        signal.signal(s, handler)
    return old


def noting() -> None:
    """From now on in this process, SIGINT and SIGTERM are noted in :data:`received`."""
    _install(_note)


@contextmanager
def raising():
    """While the block runs, the first SIGINT or SIGTERM raises :class:`Interrupted` (at once on
    entry if one was noted before). Afterwards the earlier handlers are back, or, once a signal
    came, signals are only noted: the process is on its way out and must finish its writes."""
    old = _install(_raise)
    try:
        if received is not None:
            raise Interrupted(received)
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, _note if received is not None else (handler if handler is not None else signal.SIG_DFL))
