"""lm-eval task YAML read as data, without building a task (building downloads the data).

lm-eval's YAML conventions, read with qeval's own code rather than lm-eval's private modules
(``lm_eval.tasks._yaml_loader``, ``_index``, which appeared in 0.4.10 and may move): ``include:``
merges the named files first (relative to the including file; the including file's keys win, and
an included ``task_list`` is not inherited), and a ``!function`` tag stays a string (its path),
never imported. The task index is lm-eval's public ``TaskManager``: ``all_tags``,
``all_groups``, ``task_index``.
"""

from __future__ import annotations

from pathlib import Path

import yaml


class _TaskLoader(yaml.SafeLoader):
    """Safe YAML plus lm-eval's ``!function module.name`` tag, kept as text."""


_TaskLoader.add_constructor("!function", lambda loader, node: str(loader.construct_scalar(node)))


def load_task_yaml(path: str | Path, _seen: frozenset[Path] = frozenset()) -> dict:
    """The merged config of one lm-eval YAML file (includes resolved, functions unresolved)."""
    path = Path(path).expanduser().resolve()
    if path in _seen:
        raise ValueError(f"lm-eval task YAML: include cycle at {path}")
    with path.open("rb") as fh:
        cfg = yaml.load(fh, Loader=_TaskLoader)  # noqa: S506 - a SafeLoader subclass
    if not isinstance(cfg, dict):
        raise ValueError(f"lm-eval task YAML: expected a mapping in {path}, got {type(cfg).__name__}")
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        inc_cfg = load_task_yaml(path.parent / inc, _seen | {path})
        inc_cfg.pop("task_list", None)
        merged.update(inc_cfg)
    return merged | cfg


def entry_field(entry, name: str):
    """A field of a ``TaskManager.task_index`` entry: an object since lm-eval 0.4.10, a dict
    before (``type``/``task``/``yaml_path``)."""
    if isinstance(entry, dict):
        legacy = {"yaml_path": "yaml_path", "tags": "task"}[name]
        value = entry.get(legacy)
        return None if value == -1 else value
    return getattr(entry, name, None)
