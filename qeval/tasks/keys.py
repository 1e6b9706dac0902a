"""Checks of a task's own keys, each raising one line that names ``task.<name>.<key>``, the value
and what is allowed. Tasks call these from their ``check(name, node, model)`` (``model`` is a
:class:`qeval.model.loading.ModelFacts`), which validation runs before any weights load."""

from __future__ import annotations

from qeval.errors import ConfigError


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(task: str, node, key: str, low: int = 1, high: int | None = None, nullable: bool = False) -> None:
    v = node.get(key)
    if v is None and nullable:
        return
    if not _is_int(v) or v < low or (high is not None and v > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        null = " or null" if nullable else ""
        raise ConfigError(f"task.{task}.{key}={v}: allowed: an integer {bound}{null}")


def integers(task: str, node, key: str, low: int = 1, high: int | None = None) -> None:
    vs = node.get(key)
    bound = f"from {low} to {high}" if high is not None else f">= {low}"
    if not vs or isinstance(vs, str) or not all(_is_int(v) for v in vs):
        raise ConfigError(f"task.{task}.{key}={vs}: allowed: a non-empty list of integers {bound}")
    bad = [v for v in vs if v < low or (high is not None and v > high)]
    if bad:
        raise ConfigError(f"task.{task}.{key}={list(vs)}: {bad[0]} is out of range; allowed: integers {bound}")


def fractions(task: str, node, key: str) -> None:
    vs = node.get(key)
    if not vs or isinstance(vs, str) or not all(_is_number(v) and 0 <= v <= 1 for v in vs):
        raise ConfigError(f"task.{task}.{key}={vs}: allowed: a non-empty list of numbers in [0, 1]")


def choice(task: str, node, key: str, allowed: tuple[str, ...]) -> None:
    if node.get(key) not in allowed:
        raise ConfigError(f"task.{task}.{key}={node.get(key)}: allowed: {', '.join(allowed)}")


def max_positions(arch) -> int | None:
    """The longest sequence the model's positions allow (None when the config does not say)."""
    text = arch.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(text, key, None), int):
            return getattr(text, key)
    return None
