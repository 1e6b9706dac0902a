"""The options of each config group: the YAML files of ``qeval/configs/<group>/``, and nothing a
name could reach outside that folder."""

from __future__ import annotations

from qeval import CONFIG_DIR

GROUPS = ("model", "method", "calibration", "task", "experiment", "weight", "act", "kv", "evict", "transform")
PART_GROUPS = ("weight", "act", "kv", "evict")   # one part each (qeval.recipe.slots); transform is a list


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
