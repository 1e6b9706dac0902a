"""The command line read against the config tree, before Hydra starts and before anything heavy
is imported (no torch, transformers or lm-eval): unknown groups, options and keys with a
did-you-mean, composition of every cell, a writable results folder. What needs the method or the
model's architecture is :mod:`qeval.validate`.
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from qeval import CONFIG_DIR
from qeval.errors import ConfigError

GROUPS = ("model", "method", "calibration", "task", "experiment")


def _did_you_mean(value: str, options) -> str:
    close = difflib.get_close_matches(value, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _values(raw: str) -> list[str]:
    raw = raw.strip()
    if raw.startswith(("choice(", "range(", "glob(", "interval(")):
        return []  # sweep functions are left to Hydra
    raw = raw.strip("[]")
    return [v.strip() for v in raw.split(",") if v.strip()]


def check_overrides(argv: list[str]) -> None:
    top = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())
    top_keys = set(top) - {"defaults"}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key.startswith("hydra"):
            continue
        head = key.split(".")[0]
        if key in GROUPS:
            allowed = options(key)
            for v in _values(value):
                if v not in allowed:
                    raise ConfigError(f"{key}={v}: unknown {key}{_did_you_mean(v, allowed)} "
                                      f"(allowed: {', '.join(allowed)})")
        elif head not in top_keys and head not in GROUPS:   # with or without +
            known = sorted(top_keys | set(GROUPS))
            raise ConfigError(f"{key}={value}: unknown key{_did_you_mean(head, known)} "
                              f"(top-level keys: {', '.join(known)})")


def _one_line(e: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line, without their internal details."""
    skip = ("full_key", "object_type", "reference_type", "To append", "Set the environment")
    lines = [l.strip() for l in str(e).splitlines() if l.strip() and not l.strip().startswith(skip)]
    return "; ".join(lines) or type(e).__name__


def check_composes(argv: list[str]) -> None:
    """Every cell the command line asks for composes (Hydra's own errors, as one line), no node
    holds a key its YAML does not define, and results can be written; before Hydra starts, so
    nothing runs or is written."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from qeval.sweep import expand

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "task" and value.strip() in ("[]", ""):
            raise ConfigError(f"task={value}: at least one task (allowed: {', '.join(options('task'))})")
    def composed(cell: list[str]):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=cell)

    try:
        try:
            _check_sweep_has_multirun(argv, overrides)
            cells = expand(overrides)
            configs = [composed(cell) for cell in cells]
        except HydraException as e:
            raise _unknown_override(e, overrides, composed) from e
        for cfg in configs:
            check_results_dir(cfg.results_dir)
            check_known_keys(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e)) from e


def _check_sweep_has_multirun(argv, overrides) -> None:
    """``kv_bits=2,4`` sweeps only under ``-m`` (or an experiment that is a sweep)."""
    fixed = fixed_overrides(overrides)
    sweep = next((o for o in overrides if o not in fixed), None)
    if sweep is None or _multirun(argv, _composed_with_hydra(overrides)):
        return
    key, _, value = sweep.partition("=")
    raise ConfigError(f"{sweep}: a sweep needs -m (`python -m qeval -m {sweep}`); a list is "
                      f"{key}=[{value}]")


def _unknown_override(e: Exception, cell: list[str], composed) -> Exception:
    """Hydra's "Could not override 'method.foo'" as qeval's unknown-key line, naming the keys the
    node has; any other composition error unchanged."""
    first = str(e).splitlines()[0] if str(e) else ""
    if not first.startswith("Could not override '"):
        return e
    key = first.split("'")[1]
    arg = next((a for a in cell if a.lstrip("+~").partition("=")[0] == key), f"{key}=")
    try:   # the node as it composes without the unknown key
        cfg = composed([a for a in cell if a != arg])
        node = OmegaConf.select(cfg, key.rpartition(".")[0])
    except Exception:   # noqa: BLE001 - only a nicer message is at stake; the original stands
        return e
    if node is None or not hasattr(node, "keys"):
        return e
    leaf, known = key.rpartition(".")[2], set(node.keys())
    return ConfigError(f"{key}={arg.partition('=')[2]}: unknown key{_did_you_mean(leaf, known)} "
                       f"({key.rpartition('.')[0]} has: {', '.join(sorted(known))})")


def check_results_dir(results_dir) -> None:
    """A directory, or a place one can be made: its nearest existing ancestor is a writable
    directory (nothing is created here)."""
    path = Path(str(results_dir)).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"results_dir={results_dir}: exists and is not a directory; allowed: a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"results_dir={results_dir}: {probe} is not writable; allowed: a writable directory")


def option_node(group: str, option: str) -> dict:
    """An option's YAML as written (``qeval/configs/<group>/<option>.yaml``)."""
    return yaml.safe_load((CONFIG_DIR / group / f"{option}.yaml").read_text()) or {}


def yaml_keys(group: str, option: str) -> set[str]:
    """The keys an option's YAML defines."""
    return set(option_node(group, option)) - {"defaults"}


MODEL_KEYS = ("name", "path", "revision", "trust_remote_code", "random_config")


def check_known_keys(cfg) -> None:
    """Every key of the method's and the tasks' nodes is one its YAML defines, so a key added with
    ``+`` (a typo Hydra would otherwise accept) is refused like any unknown key."""
    nodes = [("method", cfg.method, yaml_keys("method", cfg.method.name)),
             ("model", cfg.model, set(MODEL_KEYS))]
    if "calibration" in cfg and cfg.calibration.name in options("calibration"):
        nodes.append(("calibration", cfg.calibration, yaml_keys("calibration", cfg.calibration.name)))
    nodes += [(f"task.{name}", node, yaml_keys("task", name)) for name, node in cfg.task.items()
              if name in options("task")]
    for prefix, node, known in nodes:
        for key in node:
            if key not in known:
                raise ConfigError(f"{prefix}.{key}={node[key]}: unknown key{_did_you_mean(key, known)} "
                                  f"({prefix} has: {', '.join(sorted(known))})")


def fixed_overrides(overrides: list[str]) -> list[str]:
    """The overrides that are not sweeps (``kv_bits=2,4`` is one), parsed by Hydra's grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]


def _composed_with_hydra(overrides: list[str]):
    """The command's config with its ``hydra`` node, sweep overrides left out (each cell of a
    sweep has the same launcher and mode); composed once per command line, read-only."""
    return _compose_fixed(tuple(fixed_overrides(overrides)))


@functools.lru_cache(maxsize=8)
def _compose_fixed(fixed: tuple[str, ...]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(fixed), return_hydra_config=True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _multirun(flags: list[str], cfg) -> bool:
    return any(f in ("-m", "--multirun") for f in flags) or str(cfg.hydra.get("mode")).endswith("MULTIRUN")


def is_sweep(flags: list[str], overrides: list[str]) -> bool:
    """``-m``, a sweep value, or an experiment that is a sweep."""
    return (any(f in ("-m", "--multirun") for f in flags) or len(fixed_overrides(overrides)) < len(overrides)
            or _multirun(flags, _composed_with_hydra(overrides)))


def cell_configs(overrides: list[str], with_hydra: bool = False):
    """(cell overrides, composed config) for every cell of a sweep line, in the order it runs."""
    from hydra import compose, initialize_config_dir

    from qeval.sweep import expand

    for cell in expand(overrides):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            yield cell, compose("config", overrides=cell, return_hydra_config=with_hydra)


def check_launcher(flags: list[str], overrides: list[str]) -> None:
    """A sweep's launcher can start here: submitit is importable, and SLURM's ``sbatch`` is on
    PATH for ``hydra/launcher=slurm``; otherwise one line now, not a traceback from inside Hydra."""
    import importlib.util
    import shutil

    cfg = _composed_with_hydra(overrides)
    target = str(cfg.hydra.launcher.get("_target_", ""))
    if not _multirun(flags, cfg) or "qeval_launchers" not in target:
        return
    name = "slurm" if target.endswith("SlurmLauncher") else "local"
    if importlib.util.find_spec("submitit") is None:
        raise ConfigError(f"hydra/launcher={name}: submitit is not installed; allowed: pip install "
                          f"hydra-submitit-launcher, or the basic launcher (leave hydra/launcher out)")
    if name == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher=slurm: sbatch is not on PATH, so no job can be submitted from this "
                          "machine; allowed: a SLURM login node, hydra/launcher=local (subprocesses here), or "
                          "the basic launcher (leave hydra/launcher out)")


def single_run_config(flags: list[str], overrides: list[str]):
    """The composed config of a single run (no ``-m``, no sweeping experiment), to validate whole
    before Hydra writes its run folder; None for a sweep, whose cells are checked as they run (a
    bad cell becomes a failed row and the sweep goes on)."""
    from omegaconf import open_dict

    cfg = _composed_with_hydra(overrides)
    if _multirun(flags, cfg):
        return None
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
