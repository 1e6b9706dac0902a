"""The one error a user sees for bad input: one line naming the key, the value and what is allowed.

Every layer raises it (validation, a method's own checks, a kernel that cannot hold a layout), so
it lives in a module that imports nothing of qeval's.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A one-line, user-facing configuration error."""


def check_divides(key: str, g: int | None, dims, model_name: str, what: str) -> None:
    """One shared message for a group size that does not divide a dimension it groups."""
    if g is None:
        return
    bad = sorted(d for d in set(dims) if d % g)
    if bad:
        raise ConfigError(f"{key}={g}: does not divide {what}={bad[0]} of model {model_name}; "
                          f"allowed: a divisor of {', '.join(map(str, sorted(set(dims))))}")
