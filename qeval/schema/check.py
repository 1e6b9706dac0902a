"""The composed config read against the schema (:mod:`qeval.schema.nodes`): every key known,
every value of its type, nothing required missing, every interpolation resolvable. One line per
refusal, naming the key, the value and what is allowed; run on every cell before Hydra writes
anything and before torch is imported."""

from __future__ import annotations

import difflib
from pathlib import PurePath

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qeval.errors import ConfigError
from qeval.schema import nodes
from qeval.schema.groups import PART_GROUPS, options
from qeval.schema.types import Choice, Label, Optional, shown


def did_you_mean(value: str, choices) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def resolved(cfg: DictConfig) -> dict:
    """The config as plain containers with every interpolation resolved; an interpolation that
    loops, names a missing key or a ``???`` left unset is one line naming its key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raw = raw_value(OmegaConf.to_container(cfg, resolve=False), key)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{key}={shown(raw)}: {why}; allowed: a value, or an interpolation of a key that "
                          f"is set (${{key}})") from None


def raw_value(tree: dict, key: str):
    """The value at dotted ``key`` as written (its interpolation unresolved), or None."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def check_node(prefix: str, node, schema: dict, what: str) -> None:
    """``node``'s keys against ``schema``: unknown keys, values of the wrong type, missing keys."""
    def full(key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    if not isinstance(node, dict):
        raise ConfigError(f"{prefix}={shown(node)}: allowed: {what}'s keys ({', '.join(schema)})")
    for key, value in node.items():
        if key not in schema:
            known = sorted(schema)
            where = f"{prefix} has" if prefix else "top-level keys"
            raise ConfigError(f"{full(key)}={shown(value)}: unknown key{did_you_mean(key, known)} "
                              f"({where}: {', '.join(known)})")
        t = schema[key]
        if isinstance(t, dict):
            check_node(full(key), value, t, full(key))
        elif problem := t.problem(full(key), value):
            raise ConfigError(problem)
    for key, t in schema.items():
        if key not in node and not isinstance(t, Optional):
            allowed = f"{full(key)}'s keys ({', '.join(t)})" if isinstance(t, dict) else t.allowed
            raise ConfigError(f"{full(key)}: missing; allowed: {allowed}")


def check(cfg: DictConfig) -> dict:
    """The composed config (without its ``hydra`` node) against the schema; returns it resolved."""
    tree = resolved(cfg)
    for group in ("model", "method", "calibration", "task"):
        if tree.get(group) is None:
            raise ConfigError(f"{group}: missing; allowed: {group}=<one of {', '.join(options(group))}>")
    top = {k: v for k, v in tree.items() if k not in ("model", "method", "calibration", "task", *PART_GROUPS,
                                                      "transform")}
    check_node("", top, nodes.TOP, "the config")
    check_node("model", tree["model"], nodes.MODEL, "a model")
    methods = nodes.methods()
    check_method("method", tree["method"])
    for slot in PART_GROUPS:
        if tree.get(slot) is not None:
            check_part(slot, slot, tree[slot], methods)
    transforms = tree.get("transform") or {}
    if not isinstance(transforms, dict):
        raise ConfigError(f"transform={shown(transforms)}: allowed: a list of {', '.join(options('transform'))}")
    for key, node in transforms.items():
        check_part("transform", f"transform.{key}", node, methods)
    check_node("calibration", tree["calibration"], nodes.CALIBRATION, "a calibration")
    check_tasks(tree["task"])
    return tree


def check_method(key: str, node) -> None:
    """A method's node (``method``, or a recipe part's under ``key``) against that method's schema."""
    methods = nodes.methods()
    name = node.get("name") if isinstance(node, dict) else None
    if name not in methods:
        raise ConfigError(f"{key}.name={shown(name)}: unknown method{did_you_mean(name, methods)} "
                          f"(allowed: {', '.join(sorted(methods))})")
    check_node(key, node, {"name": Choice((name,))} | methods[name], f"method {name}")


def check_part(group: str, key: str, node, methods: dict) -> None:
    """A recipe part's node: a method that group offers (its files), with that method's keys."""
    name = node.get("name") if isinstance(node, dict) else None
    allowed = options(group)
    if name not in allowed or name not in methods:
        raise ConfigError(f"{key}.name={shown(name)}: unknown {group} part{did_you_mean(name, allowed)} "
                          f"(allowed: {', '.join(allowed)})")
    check_node(key, node, {"name": Choice((name,))} | methods[name], f"{group} part {name}")


def check_tasks(task) -> None:
    schemas = nodes.tasks()
    if not isinstance(task, dict) or not task:
        raise ConfigError(f"task={shown(task)}: at least one task (allowed: {', '.join(options('task'))})")
    for name, node in task.items():
        if name not in schemas:
            raise ConfigError(f"task={shown(name)}: unknown task{did_you_mean(name, schemas)} "
                              f"(allowed: {', '.join(sorted(schemas))})")
        check_node(f"task.{name}", node, schemas[name], f"task {name}")


JOB_NAME = Label("a name")   # the job's log file is named after it


def check_hydra(hydra_node) -> None:
    """The Hydra keys that name files: the job's name (its log file) stays one name, the run and
    sweep folders are given, and a cell's subfolder stays inside its sweep folder."""
    node = OmegaConf.to_container(hydra_node, resolve=False)
    job_name = node.get("job", {}).get("name")
    if problem := JOB_NAME.problem("hydra.job.name", job_name):
        raise ConfigError(problem)
    for key in ("run.dir", "sweep.dir", "sweep.subdir"):
        group, _, leaf = key.partition(".")
        value = node.get(group, {}).get(leaf)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"hydra.{key}={shown(value)}: allowed: a folder (a non-empty path)")
    # a cell's folder and the .hydra folder of saved configs stay inside their run's folder
    for key, value in (("sweep.subdir", node["sweep"]["subdir"]), ("output_subdir", node.get("output_subdir"))):
        if value is None and key == "output_subdir":   # null: Hydra saves no configs
            continue
        path = PurePath(str(value))
        if path.is_absolute() or ".." in path.parts:
            raise ConfigError(f"hydra.{key}={shown(value)}: allowed: a relative folder inside the run's "
                              f"folder (no '..', not absolute)")
