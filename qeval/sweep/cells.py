"""The cells of a sweep: which override lists the basic sweeper launches, and where each one's
rows land."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from qeval import CONFIG_DIR, results


def expand(overrides: Sequence[str], params: Mapping[str, object] | None = None) -> list[list[str]]:
    """The cells of the sweep that ``overrides`` (a ``python -m qeval`` command line) describes, in
    launch order, each as the override list the basic sweeper launches it with.

    The arguments are the experiment's ``hydra.sweeper.params`` followed by the command line, and
    the cells are their product exactly as Hydra's ``BasicSweeper`` takes it: ``k=a,b`` and
    ``k=choice(a,b)`` sweep ``k`` over ``a`` and ``b``; a plain ``k=v`` is in every cell; a key
    given on the command line replaces the experiment's value for it, in the experiment's place in
    the order (``kv_bits=4`` runs only 4 bits, ``kv_bits=2,4`` only those two).

    ``params`` are the ``hydra.sweeper.params`` to use, for a caller that already has the composed
    config (a Hydra callback). Without them, they are read from the config that the command line's
    non-sweep overrides compose from ``configs/``; that initializes Hydra for the moment, so call it
    outside any ``initialize`` context or ``@hydra.main``.

    >>> for cell in expand(["experiment=kivi_smoke", "kv_bits=16,2"]):  # kivi_smoke: kv_bits 2,4,16
    ...     print(" ".join(cell))
    model=toy kv_bits=16 task=passkey experiment=kivi_smoke
    model=toy kv_bits=2 task=passkey experiment=kivi_smoke
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(overrides)
    parser = OverridesParser.create()
    if params is None:
        # the sweep overrides are the cells', not the head config's (Hydra composes it the same way)
        fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            head = compose("config", overrides=fixed, return_hydra_config=True)
            swept = [f"{k}={v}" for k, v in (head.hydra.sweeper.get("params") or {}).items()]
    else:
        swept = [f"{k}={v}" for k, v in params.items()]
    # without a max_batch_size the basic sweeper makes one batch of every cell
    (cells,) = BasicSweeper.split_arguments(parser.parse_overrides(swept + overrides), None)
    return cells


def count_cells(config: DictConfig) -> int | None:
    """Number of cells the basic sweeper will launch (``expand`` of the sweep's command line with
    the composed config's ``hydra.sweeper.params``); None for other sweepers."""
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None  # other sweepers (optuna, ...) decide the cells as they go
    return len(expand(config.hydra.overrides.task, config.hydra.sweeper.get("params") or {}))


def run_dir_of(task_cfg: DictConfig) -> Path:
    """The run directory ``qeval.run.run`` uses for this cell (same hash, same place)."""
    container = OmegaConf.to_container(task_cfg, resolve=True)
    return Path(task_cfg.results_dir) / "runs" / results.config_hash(container)
