"""Name -> implementation tables. Registry key = module name = config file name (``kivi``)."""

from __future__ import annotations

from typing import Callable

METHODS: dict[str, type] = {}
TASKS: dict[str, Callable] = {}


def register_method(name: str):
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def register_task(name: str):
    def deco(fn):
        TASKS[name] = fn
        return fn
    return deco


def load_all() -> None:
    """Import the modules whose import registers methods and tasks."""
    import qeval.methods  # noqa: F401
    import qeval.tasks  # noqa: F401
