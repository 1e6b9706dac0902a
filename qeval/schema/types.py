"""The types a config value can have, each able to say whether a value fits and what it allows.

Values arrive as Hydra's override grammar and YAML parse them: ``true`` is a bool, ``4`` an int,
``'4'`` a string, ``[1, 2]`` a list, ``null`` None. A bool is never taken for an integer (``kv_bits=true``
would quantize to 1 bit) and a string is never taken for a bool (``"maybe"`` is truthy).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

# shown values are cut: a 10 MB value must not become a 10 MB error line
SHOWN_CHARS = 120


def shown(v) -> str:
    """A value as the user would type it back: ``true``, ``null``, ``[1, 2]``, cut when long."""
    if v is None:
        text = "null"
    elif isinstance(v, bool):
        text = "true" if v else "false"
    elif isinstance(v, (list, tuple)):
        text = "[" + ", ".join(shown(x) for x in v) + "]"
    elif isinstance(v, dict):
        text = "{" + ", ".join(f"{k}: {shown(x)}" for k, x in v.items()) + "}"
    else:
        text = str(v)
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """An int or a finite float (``1e400`` parses as inf)."""
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


class Type(ABC):
    """A value's type: ``fits(v)`` and ``allowed`` (the words after "allowed:" in an error)."""

    allowed = "a value"

    @abstractmethod
    def fits(self, v) -> bool:
        """Whether ``v`` (as Hydra's grammar or YAML parsed it) is a value of this type."""

    def problem(self, key: str, v) -> str | None:
        """The one-line error for ``key=v``, or None when it fits."""
        return None if self.fits(v) else f"{key}={shown(v)}: allowed: {self.allowed}"


@dataclass(frozen=True)
class Int(Type):
    low: int | None = None
    high: int | None = None

    @property
    def allowed(self) -> str:
        if self.low is not None and self.high is not None:
            return f"an integer from {self.low} to {self.high}"
        return f"an integer >= {self.low}" if self.low is not None else "an integer"

    def fits(self, v) -> bool:
        return is_int(v) and (self.low is None or v >= self.low) and (self.high is None or v <= self.high)


@dataclass(frozen=True)
class Number(Type):
    """An int or a finite float; ``low``/``high`` inclusive."""

    low: float | None = None
    high: float | None = None

    @property
    def allowed(self) -> str:
        if self.low is not None and self.high is not None:
            return f"a number in [{self.low}, {self.high}]"
        return f"a number >= {self.low}" if self.low is not None else "a number"

    def fits(self, v) -> bool:
        return is_number(v) and (self.low is None or v >= self.low) and (self.high is None or v <= self.high)


@dataclass(frozen=True)
class Bool(Type):
    allowed = "true, false"

    def fits(self, v) -> bool:
        return isinstance(v, bool)


@dataclass(frozen=True)
class Str(Type):
    """A non-empty string, described by what it names."""

    what: str = "a non-empty string"

    @property
    def allowed(self) -> str:
        return self.what

    def fits(self, v) -> bool:
        return isinstance(v, str) and v.strip() != "" and "\x00" not in v


@dataclass(frozen=True)
class Choice(Type):
    values: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return ", ".join(self.values)

    def fits(self, v) -> bool:
        return isinstance(v, str) and v in self.values


@dataclass(frozen=True)
class Pattern(Type):
    """A string matching ``regex`` whole, described by ``what``."""

    regex: str
    what: str

    @property
    def allowed(self) -> str:
        return self.what

    def fits(self, v) -> bool:
        return isinstance(v, str) and re.fullmatch(self.regex, v) is not None


# a name that becomes part of a path or a label: one path component that cannot climb out of its
# folder (no separator, no leading dot), printable, and short enough for a file name
LABEL = r"[^\x00-\x1f\x7f/\\.][^\x00-\x1f\x7f/\\]{0,99}"


def Label(what: str = "a name") -> Pattern:
    return Pattern(LABEL, f"{what} of 1 to 100 printable characters, without '/' or '\\' or a leading '.'")


@dataclass(frozen=True)
class Nullable(Type):
    inner: Type

    @property
    def allowed(self) -> str:
        return f"null or {self.inner.allowed}"

    def fits(self, v) -> bool:
        return v is None or self.inner.fits(v)

    def problem(self, key: str, v) -> str | None:
        if v is None:
            return None
        # a type with its own messages (a mapping's keys) speaks for itself
        return self.inner.problem(key, v) if type(self.inner).problem is not Type.problem else super().problem(key, v)


@dataclass(frozen=True)
class ListOf(Type):
    item: Type
    non_empty: bool = True

    @property
    def allowed(self) -> str:
        return f"a {'non-empty ' if self.non_empty else ''}list of {plural(self.item.allowed)}"

    def fits(self, v) -> bool:
        return isinstance(v, list) and (bool(v) or not self.non_empty) and all(self.item.fits(x) for x in v)


@dataclass(frozen=True)
class AnyOf(Type):
    options: tuple[Type, ...]

    @property
    def allowed(self) -> str:
        return " or ".join(o.allowed for o in self.options)

    def fits(self, v) -> bool:
        return any(o.fits(v) for o in self.options)


def plural(allowed: str) -> str:
    """"an integer >= 1" -> "integers >= 1" (for a list's items)."""
    for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a non-empty string", "non-empty strings"),
                      ("a name", "names")):
        if allowed.startswith(one):
            return many + allowed[len(one):]
    return allowed


@dataclass(frozen=True)
class Optional(Type):
    """A key that may be absent from its node (present, it has the inner type)."""

    inner: Type

    @property
    def allowed(self) -> str:
        return self.inner.allowed

    def fits(self, v) -> bool:
        return self.inner.fits(v)

    def problem(self, key: str, v) -> str | None:
        return self.inner.problem(key, v)


# architecture keys that count something: zero of them builds a model that computes nothing
COUNT_KEY = re.compile(r"num_\w+|\w+_size|max_position_embeddings|n_\w+")


@dataclass(frozen=True)
class ArchConfig(Type):
    """A transformers config as keyword arguments: ``model_type`` names the architecture, every
    other value is a scalar, a list of them or a mapping to them (``rope_parameters``), and the
    counts (layers, heads, sizes) are >= 1."""

    allowed = "a mapping with model_type and the architecture's config keys"

    def problem(self, key: str, v) -> str | None:
        if not isinstance(v, dict):
            return f"{key}={shown(v)}: allowed: {self.allowed}"
        if not Str().fits(v.get("model_type")):
            return f"{key}.model_type={shown(v.get('model_type'))}: allowed: a transformers model type (llama, opt, ...)"
        def scalar(y) -> bool:
            return y is None or isinstance(y, (bool, str)) or is_number(y)

        for k, x in v.items():
            # a mapping of scalars too: a nested config such as Llama-3.1's rope_parameters
            if not (scalar(x) or (isinstance(x, list) and all(map(scalar, x)))
                    or (isinstance(x, dict) and all(map(scalar, x.values())))):
                return (f"{key}.{k}={shown(x)}: allowed: a number, a string, true, false, null, a list of them "
                        f"or a mapping to them")
            if COUNT_KEY.fullmatch(str(k)) and x is not None and not Int(1).fits(x):
                return f"{key}.{k}={shown(x)}: allowed: null or an integer >= 1"
        return None

    def fits(self, v) -> bool:
        return self.problem("", v) is None
