"""The row schema: what a row of ``rows.jsonl`` must hold for the report to use it.

A row is what :func:`qeval.run.base_row` and a task write (or :func:`qeval.run.record_failure`
for a cell that failed before its method was built): a JSON object. The report groups, labels
and names files by a few of its keys, so those are checked on read; a row that does not fit is
named (file, line, key, why) and skipped, never fatal (:mod:`qeval.report.runs`).

============  =========  ===================================================================
key           required   type
============  =========  ===================================================================
model         yes        text (at most :data:`NAME_CHARS` characters, as every name below)
method        yes        text
task          yes        text (a failed cell of several tasks: ``a,b``)
status        yes        ``ok``, ``failed`` or ``interrupted``
metric        yes        text; null in a failed (or interrupted) row
value         yes        a number or null (never a boolean)
target ...    no         text or null: target, setting, dtype, subtask, the ``*_format`` keys,
                         kv_semantics, zero_point, error, run_id, config_hash
w_bits ...    no         an integer or null: w_bits, a_bits, kv_bits, k_bits, v_bits; a failed
                         row may also hold the text or number a user typed there
kv_budget     no         a number or null
config        no         an object (the resolved config) or null, at most :data:`CONFIG_DEPTH`
                         levels and :data:`CONFIG_NODES` values
any other     no         any JSON value; a list or object becomes JSON text, so that every cell
                         of the table is a plain value
============  =========  ===================================================================

A row has at most :data:`ROW_KEYS` keys, each at most :data:`KEY_CHARS` characters. Other numeric
columns (``n``, ``stderr``, ``length``, ...) are not checked: :func:`qeval.report.gather.add_derived`
makes anything but a number in them missing, as it always has.
"""

from __future__ import annotations

import json
import math
import re
from numbers import Real

NAME_CHARS = 1024      # a model, method, task or metric name; a longer one is not a name
KEY_CHARS = 256
ROW_KEYS = 2000        # a real row has about a hundred
CONFIG_DEPTH = 32
CONFIG_NODES = 20_000
STATUSES = ("ok", "failed", "interrupted")   # interrupted: a cell stopped by a signal, a failed row
REQUIRED = ("model", "method", "task", "status", "metric", "value")
NAMES = ("model", "method", "task", "metric", "target", "setting", "dtype", "subtask")
TEXT_OR_NULL = ("target", "setting", "dtype", "subtask", "w_format", "a_format", "kv_format",
                "kv_semantics", "zero_point", "error", "run_id", "config_hash")
BITS = ("w_bits", "a_bits", "kv_bits", "k_bits", "v_bits")
INT64 = 2**63 - 1
SURROGATE = re.compile("[\ud800-\udfff]")


def _type(x) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean", type(None): "null"}.get(
        type(x), "a number" if isinstance(x, Real) else type(x).__name__)


def _is_number(x) -> bool:
    """A JSON number pandas can hold (an integer beyond 64 bits is not: it cannot become a float
    column, and fails on writing Parquet)."""
    return isinstance(x, Real) and not isinstance(x, bool) and not (isinstance(x, int) and abs(x) > INT64)


def _is_int(x) -> bool:
    return _is_number(x) and (isinstance(x, int) or (isinstance(x, float) and x.is_integer()))


def row_problem(row) -> tuple[str, str] | None:
    """(key, why) for a row that does not fit the schema (key ``-`` for the row as a whole);
    None for a row the report can use."""
    if not isinstance(row, dict):
        return "-", f"a row must be a JSON object, not {_type(row)}"
    if len(row) > ROW_KEYS:
        return "-", f"{len(row)} keys, more than {ROW_KEYS}"
    for key in row:
        if len(key) > KEY_CHARS:
            return key[:40] + "…", f"a key longer than {KEY_CHARS} characters"
    for key in REQUIRED:
        if key not in row:
            return key, "missing"
    failed = row["status"] != "ok"
    checks = [(k, _text_problem(row[k], allow_null=False)) for k in ("model", "method", "task")]
    checks += [("status", None if row["status"] in STATUSES else f"must be one of {', '.join(STATUSES)}, "
                f"not {_shown(row['status'])}"),
               ("metric", _text_problem(row["metric"], allow_null=failed)),
               ("value", None if row["value"] is None or _is_number(row["value"])
                else f"must be a number or null, not {_type(row['value'])}")]
    checks += [(k, _text_problem(row[k], allow_null=True)) for k in TEXT_OR_NULL if k in row]
    checks += [(k, _bits_problem(row[k], failed)) for k in BITS if k in row]
    if "kv_budget" in row and not (row["kv_budget"] is None or _is_number(row["kv_budget"])):
        checks.append(("kv_budget", f"must be a number or null, not {_type(row['kv_budget'])}"))
    if row.get("config") is not None:
        checks.append(("config", config_problem(row["config"])))
    return next(((k, why) for k, why in checks if why), None)


def _shown(x) -> str:
    return repr(x)[:40] if isinstance(x, str) else _type(x)


def _text_problem(x, allow_null: bool) -> str | None:
    if x is None:
        return None if allow_null else "must be text, not null"
    if not isinstance(x, str):
        return f"must be text{' or null' if allow_null else ''}, not {_type(x)}"
    return f"{len(x)} characters, more than {NAME_CHARS}" if len(x) > NAME_CHARS else None


def _bits_problem(x, failed: bool) -> str | None:
    if x is None or _is_int(x):
        return None
    if failed and (isinstance(x, str) and len(x) <= NAME_CHARS or _is_number(x) and math.isfinite(x)):
        return None   # a failed row keeps what the user typed; it is labelled "?"
    return f"must be an integer or null, not {_type(x)}"


def config_problem(config) -> str | None:
    """Why a row's nested ``config`` is unusable (not an object, too deep, too large); None if fine."""
    if not isinstance(config, dict):
        return f"must be an object or null, not {_type(config)}"
    stack, nodes = [(config, 1)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > CONFIG_NODES:
            return f"more than {CONFIG_NODES} values"
        if depth > CONFIG_DEPTH:
            return f"nested more than {CONFIG_DEPTH} levels"
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children)
    return None


def plain(x):
    """A value as a table cell: a list, set or object as JSON text (hashable, comparable, one
    cell), an integer beyond 64 bits as text, anything else as it is."""
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) > INT64:
        return str(x)
    if isinstance(x, (list, dict, tuple, set)):
        try:
            return json.dumps(x, default=str)
        except (TypeError, ValueError, RecursionError):   # a key JSON cannot hold, a cycle
            return str(x)
    return x


def normalised(row: dict) -> dict:
    """A row that passed :func:`row_problem`, with every value but ``config`` a plain value."""
    return {k: v if k == "config" else plain(v) for k, v in row.items()}


def without_surrogates(x):
    """``x`` with every lone surrogate (JSON may hold ``"\\ud800"``, UTF-8 may not, so no file
    could be written with it) replaced by U+FFFD, in keys and values at any depth."""
    if isinstance(x, str):
        return SURROGATE.sub("\ufffd", x)
    if isinstance(x, dict):
        return {without_surrogates(k): without_surrogates(v) for k, v in x.items()}
    if isinstance(x, list):
        return [without_surrogates(v) for v in x]
    return x
