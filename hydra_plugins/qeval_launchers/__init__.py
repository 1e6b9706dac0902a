"""qeval's sweep launchers, where Hydra looks for launcher plugins (``hydra_plugins``): the logic
lives in :mod:`qeval.sweep.launchers`; ``qeval/configs/hydra/launcher/{local,slurm}.yaml`` name these."""

from qeval.sweep import launchers


class LocalLauncher(launchers.RecordsKilledCells):
    _EXECUTOR = "local"


class SlurmLauncher(launchers.RecordsKilledCells):
    _EXECUTOR = "slurm"
