"""The cells of a sweep: which override lists the basic sweeper launches, and where each one's
rows land."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from qeval import CONFIG_DIR, results
from qeval.errors import ConfigError


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
    non-sweep overrides compose from ``qeval/configs/``; that initializes Hydra for the moment, so call it
    outside any ``initialize`` context or ``@hydra.main``.

    >>> for cell in expand(["experiment=kivi_smoke", "kv_bits=16,2"]):  # kivi_smoke: kv_bits 2,4,16
    ...     print(" ".join(cell))
    model=toy kv_bits=16 task=passkey experiment=kivi_smoke
    model=toy kv_bits=2 task=passkey experiment=kivi_smoke
    """
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
    # the basic sweeper's rule (BasicSweeper.split_arguments, Hydra 1.3), with Hydra's public
    # override API: one list of values per key, a later key replacing an earlier one in its place
    values: dict[str, list[str]] = {}
    for o in parser.parse_overrides(swept + overrides):
        key = o.get_key_element()
        if not o.is_sweep_override():
            values[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            values[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            raise ConfigError(f"{o.input_line}: the basic sweeper takes a list of values; allowed: k=a,b, "
                              f"k=choice(a,b) or k=range(a,b) (interval() needs another sweeper)")
    return [list(cell) for cell in itertools.product(*values.values())]


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
