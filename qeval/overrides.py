"""The command line read against the config tree, before Hydra starts and before anything heavy
is imported (no torch, transformers or lm-eval): unknown groups, options and keys with a
did-you-mean, composition of every cell, a writable results folder. What needs the method or the
model's architecture is :mod:`qeval.validate`.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from qeval import CONFIG_DIR
from qeval.errors import ConfigError
from qeval.schema import GROUPS, nodes, options
from qeval.schema import check as check_schema
from qeval.schema.check import check_hydra, did_you_mean
from qeval.schema.types import shown

HYDRA_OPTION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


_did_you_mean = did_you_mean   # (its old name here, which validate and callers import)


def _parsed(argv: list[str]):
    """The command line's overrides as Hydra's own grammar reads them (never split by hand)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg and not arg.startswith("~"):
            continue
        try:
            out.append(parser.parse_override(arg))
        except HydraException as e:
            raise ConfigError(f"{arg}: not an override ({_one_line(e)}); allowed: key=value, "
                              f"+key=value, ~key, key=a,b (a sweep)") from None
    return out


def model_path_given(argv: list[str]) -> str | None:
    """The ``model.path`` a command line sets, when it sets one string (None otherwise, or when the
    line does not parse: :func:`check_overrides` then says why)."""
    try:
        parsed = _parsed(argv)
    except ConfigError:
        return None
    for o in parsed:
        if o.key_or_group == "model.path" and not o.is_sweep_override() and isinstance(o.value(), str):
            return o.value()
    return None


def override_values(o) -> list:
    """Every value an override sets: one, or each of a sweep's (``task=[a],[b]`` is two lists)."""
    if not o.is_sweep_override():
        return [o.value()]
    try:
        values = list(o.sweep_iterator())
    except Exception as e:
        raise ConfigError(f"{o.input_line}: {type(e).__name__}: {e}; allowed: a sweep with at least one value "
                          f"(k=a,b, k=choice(a,b), k=range(start,stop,step) with step != 0)") from None
    if not values:
        raise ConfigError(f"{o.input_line}: a sweep of no values; allowed: at least one value")
    return values


def check_overrides(argv: list[str]) -> None:
    """Each override names a known key or group option, once: unknown groups, options and keys
    get a did-you-mean; a group option is one of the group's own files."""
    top_keys = set(nodes.TOP)   # config.yaml's keys (tests/test_schema.py holds them equal)
    seen: dict[str, str] = {}
    for o in _parsed(argv):
        key = o.key_or_group + (f"@{o.package}" if o.package else "")
        if key in seen:
            raise ConfigError(f"{o.input_line}: {key} is given twice ({seen[key]}, {o.input_line}); allowed: once")
        seen[key] = o.input_line
        values = override_values(o) if not o.is_delete() else []   # a sweep's values, evaluated once
        if key.startswith("hydra/"):   # Hydra's own groups: an option is a name, not a path to any YAML
            for value in values:
                if not isinstance(value, str) or not HYDRA_OPTION.fullmatch(value):
                    raise ConfigError(f"{key}={shown(value)}: allowed: the name of one of {key}'s options "
                                      f"(letters, digits, '_' and '-'; no '/' or '..')")
        if key.startswith("hydra"):
            continue
        head = key.split(".")[0]
        if key in GROUPS:
            allowed = options(key)
            for value in values:
                for v in value if isinstance(value, list) else [value]:
                    if v not in allowed:
                        raise ConfigError(f"{key}={shown(v)}: unknown {key}{_did_you_mean(str(v), allowed)} "
                                          f"(allowed: {', '.join(allowed)})")
        elif head not in top_keys and head not in GROUPS:   # with or without +
            known = sorted(top_keys | set(GROUPS))
            raise ConfigError(f"{o.input_line.lstrip('+~')}: unknown key{_did_you_mean(head, known)} "
                              f"(top-level keys: {', '.join(known)})")


def _one_line(e: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line, without their internal details."""
    skip = ("full_key", "object_type", "reference_type", "To append", "Set the environment")
    lines = [l.strip() for l in str(e).splitlines() if l.strip() and not l.strip().startswith(skip)]
    # "Error merging override k=v" says what failed; its cause says why (``not a valid bool``)
    why = e.__cause__   # (a re-raised exception can be its own cause)
    cause = _one_line(why) if why is not None and why is not e and str(e).startswith("Error merging") else ""
    return "; ".join(lines + ([cause] if cause else [])) or type(e).__name__


def check_composes(argv: list[str]) -> None:
    """Every cell the command line asks for composes (Hydra's own errors, as one line) and fits the
    schema (:mod:`qeval.schema`), Hydra's file names stay in their folders, and results can be
    written; before Hydra starts, so nothing runs or is written."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from qeval.sweep import expand

    overrides = [a for a in argv if "=" in a and not a.startswith("-") or a.startswith("~")]
    for o in _parsed(overrides):
        if o.key_or_group == "task" and not o.is_sweep_override() and o.value() in ([], "", None):
            raise ConfigError(f"{o.input_line}: at least one task (allowed: {', '.join(options('task'))})")

    def composed(cell: list[str]):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=cell)

    def composed_cell(compose_it, cell: list[str], of_many: bool):
        try:
            return compose_it(cell)
        except HydraException as e:
            better = _unknown_override(e, cell, composed, of_many)
            if better is e:
                raise   # (``raise e from e`` would make it its own cause and lose Hydra's reason)
            raise better from e

    try:
        head = composed_cell(lambda _: _composed_with_hydra(overrides), fixed_overrides(overrides), False)
        check_hydra(head.hydra)
        _check_sweep_has_multirun(argv, overrides)
        cells = expand(overrides)
        configs = [composed_cell(composed, cell, len(cells) > 1) for cell in cells]
        checked = set()
        for cfg in configs:
            tree = check_schema(cfg)
            if tree["results_dir"] not in checked:
                check_results_dir(tree["results_dir"])
                checked.add(tree["results_dir"])
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


def _unknown_override(e: Exception, cell: list[str], composed, of_many: bool = False) -> Exception:
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
    except Exception:
        return e
    parent = key.rpartition(".")[0]
    if node is None and parent:   # no such node: name the nearest one there is and its keys
        above = parent
        while above and OmegaConf.select(cfg, above) is None:
            above = above.rpartition(".")[0]
        there = OmegaConf.select(cfg, above) if above else cfg
        where = f"the cell {' '.join(cell)}" if of_many else "the config"
        return ConfigError(f"{key}={arg.partition('=')[2]}: {where} has no {parent} ({above or 'the top level'} "
                           f"has: {', '.join(sorted(map(str, there.keys())))})")
    if node is None or not hasattr(node, "keys"):
        return e
    leaf, known = key.rpartition(".")[2], set(node.keys())
    return ConfigError(f"{key}={arg.partition('=')[2]}: unknown key{_did_you_mean(leaf, known)} "
                       f"({key.rpartition('.')[0]} has: {', '.join(sorted(known))})")


def check_results_dir(results_dir) -> None:
    """A directory, or a place one can be made: no symlink on the way loops or dangles, and the
    nearest existing ancestor is a directory on a writable filesystem where a folder can really be
    made (tried and removed at once: permissions alone pass root under /sys or /proc)."""
    import tempfile

    given = str(results_dir)
    path = Path(given).expanduser().absolute()
    for p in [path, *path.parents]:
        if p.is_symlink() and not p.exists():   # exists() follows it: False for a loop or a dangling link
            raise ConfigError(f"results_dir={given}: {p} is a symlink that loops or points nowhere; "
                              f"allowed: a directory")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"results_dir={given}: exists and is not a directory; allowed: a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"results_dir={given}: {probe} is not a directory; allowed: a writable directory")
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            raise OSError("read-only filesystem")
        os.rmdir(tempfile.mkdtemp(prefix=".qeval-write-check-", dir=probe))
    except OSError as e:
        raise ConfigError(f"results_dir={given}: {probe} is not writable ({e.strerror or e}); "
                          f"allowed: a writable directory") from None


def option_node(group: str, option: str) -> dict:
    """An option's YAML as written (``qeval/configs/<group>/<option>.yaml``); only the group's own
    files are read."""
    if option not in options(group):
        raise ConfigError(f"{group}={shown(option)}: unknown {group} (allowed: {', '.join(options(group))})")
    return yaml.safe_load((CONFIG_DIR / group / f"{option}.yaml").read_text()) or {}


def yaml_keys(group: str, option: str) -> set[str]:
    """The keys an option's YAML defines."""
    return set(option_node(group, option)) - {"defaults"}


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
