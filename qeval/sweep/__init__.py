"""Sweep bookkeeping: how many cells a sweep has, which are finished, and a closing summary.

* :mod:`qeval.sweep.cells` — the cells a command line describes (``expand``) and where their rows land;
* :mod:`qeval.sweep.callback` — the Hydra callback: a marker per finished cell, the closing summary
  and exit status;
* :mod:`qeval.sweep.launchers` — the local and SLURM launchers, which turn a cell killed from
  outside into a failed row and go on with the sweep;
* :mod:`qeval.sweep.summary` — markers, the summary and the side-by-side comparison table.

``python -m qeval.sweep <sweep dir>`` prints where a sweep stands.
"""

from qeval.sweep.cells import count_cells, expand, run_dir_of
from qeval.sweep.summary import comparison

__all__ = ["comparison", "count_cells", "expand", "run_dir_of"]
