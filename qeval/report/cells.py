"""Which runs share a cell of a table or a line of a figure: the report never averages settings.

The grouping rule
-----------------
A run's *knobs* are its resolved config, flattened (``config.<key>`` columns, see
:mod:`qeval.report.gather`), with three adjustments:

* the launch keys (``hydra``, ``results_dir``, ``force``, ``resume``) are not knobs: they never
  change a number (:data:`qeval.results.NON_IDENTITY_KEYS`);
* ``dtype`` is the dtype the run resolved (the row's ``dtype``), not the ``auto`` it may have asked
  for, since that is what decides the numbers;
* in a table of one task, another task's parameters (``task.<other>.*``) are not knobs of it.

The model, the method, the bit widths and the number formats (``model.name``, ``method.name``,
``w_bits`` ... ``v_bits``, ``*_format``) are the cell's name, ``(model, method, setting)``, and
are not repeated as knobs. Every other knob whose value differs between runs of one ``(model,
method, setting)`` splits that cell: the table
says which knobs split cells ("cells also differ in: ...") and a column's label carries its values
of those that differ within its ``(method, setting)`` (``uniform KV2 [kv_semantics=simulated]``
beside ``uniform KV2 [kv_semantics=cache]``, while ``uniform W4`` stays plain); a figure's line
label does the same within its method and target. A knob that differs only between different
``(model, method, setting)`` groups already separates them and is not mentioned. ``cells.csv``
holds every knob of every cell.

Seeds are knobs like any other: runs with different seeds are different cells, labelled by their
seed, never silently averaged. A cell therefore normally holds exactly one run; when it holds
more (the same settings run again, say by other code or gathered from two result directories),
it is the mean of them and says so (``n=2 runs``), with their range when they disagree.

Full precision (target ``fp16``): a method at 16 bits is an exact identity, so the method and its
quantization knobs (``method.*``, ``kv_semantics``, the group sizes, ``backend``) do not name or
split a baseline; its dtype, task parameters, seed and model files do. A quantized cell's
difference is taken to the baseline of the same model whose non-quantization knobs are exactly
the cell's; a cell with no such baseline shows no difference rather than one to another setting.
"""

from __future__ import annotations

import math

import pandas as pd

from qeval.report.escape import cut
from qeval.report.gather import CONFIG_PREFIX
from qeval.report.style import knob_suffix, missing, precision_label

# what names a cell already: not repeated as an extra knob
# (a setting's label names its number formats too: ``W mxfp4``, ``KV fp8_e4m3``)
IDENTITY_KNOBS = frozenset({"model.name", "method.name", "w_bits", "a_bits", "kv_bits", "k_bits", "v_bits",
                            "w_format", "a_format", "kv_format",
                            # a recipe's parts: the row's method names them (``gptq+kivi``)
                            "weight.name", "act.name", "kv.name", "evict.name"})
# knobs that change nothing at 16 bits (a method at full precision is an exact identity)
QUANT_KNOBS = frozenset({"kv_semantics", "w_group_size", "a_group_size", "kv_group_size", "backend"})
# a method's and a recipe part's knobs (qeval.recipe.slots: weight.damp, kv.group_size, transform.smoothquant.alpha)
QUANT_PREFIX = ("method.", "weight.", "act.", "kv.", "evict.", "transform.")
# row columns that say what a config's "auto" resolved to
RESOLVED_KNOBS = ("dtype",)
BASELINE = "fp16"   # the internal target of a full-precision row


def is_quant_knob(name: str) -> bool:
    return name in QUANT_KNOBS or name.startswith(QUANT_PREFIX)


def knob_columns(df: pd.DataFrame, tasks: set[str] | None = None) -> dict[str, str]:
    """Knob name -> the column holding it, for rows of ``tasks`` (None: every task's keys)."""
    out = {}
    for col in df.columns:
        if not col.startswith(CONFIG_PREFIX):
            continue
        name = col[len(CONFIG_PREFIX):]
        if name in RESOLVED_KNOBS or name in IDENTITY_KNOBS:
            continue
        if name.startswith("task.") and tasks is not None and name.split(".")[1] not in tasks:
            continue
        out[name] = col
    for name in RESOLVED_KNOBS:
        if name in df:
            out[name] = name
    return dict(sorted(out.items()))


def _value(x):
    """A knob's value as a plain, comparable Python value; None when the run has no such knob.
    (pandas turns an int column with a gap into floats, and numpy scalars repr differently from
    Python's, either of which would split identical settings.)"""
    if hasattr(x, "item") and not isinstance(x, str):
        x = x.item()
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


def row_knobs(row, columns: dict[str, str]) -> tuple:
    """((name, value), ...) of one row; a full-precision row leaves its quantization knobs out."""
    full = row["target"] == BASELINE
    return tuple((name, _value(row[col])) for name, col in columns.items()
                 if not (full and is_quant_knob(name)))


def assign(rows: pd.DataFrame, tasks: set[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """``rows`` with the cell each row belongs to, and the knobs that split cells.

    Added columns: ``cell_name`` (model, method or None for full precision, setting), ``knobs`` (the
    row's knobs), ``extra`` (its values of the splitting knobs), ``base_knobs`` (its
    non-quantization knobs, what its baseline must share) and ``cell`` (cell_name + extra)."""
    rows = rows.copy()
    columns = knob_columns(rows, tasks)
    full = rows["target"] == BASELINE
    rows["cell_name"] = [(m, None if f else meth, s) for m, meth, s, f
                     in zip(rows["model"], rows["method"], rows["setting"], full)]
    rows["knobs"] = [row_knobs(r, columns) for _, r in rows.iterrows()]
    split = splitting_knobs(rows)
    rows["extra"] = [tuple((k, v) for k, v in kn if k in split) for kn in rows["knobs"]]
    rows["base_knobs"] = [tuple((k, v) for k, v in kn if not is_quant_knob(k)) for kn in rows["knobs"]]
    rows["cell"] = [(*g, e) for g, e in zip(rows["cell_name"], rows["extra"])]
    return rows, split


def splitting_knobs(rows: pd.DataFrame) -> list[str]:
    """Knobs whose value differs between runs of one (model, method, setting) group."""
    split = set()
    for _, g in rows.groupby("cell_name", sort=False):
        seen: dict[str, set] = {}
        for knobs in g["knobs"]:
            for k, v in knobs:
                seen.setdefault(k, set()).add(repr(v))
        # a knob one run has and another lacks differs too (None vs a value)
        split |= {k for k, vs in seen.items() if len(vs) > 1}
    return sorted(split)


def column_label(method, setting, extra: tuple, dtype) -> str:
    """A table column / legend label: ``uniform KV2 [kv_semantics=simulated]``; a baseline is
    named by its dtype (``fp32``), which is then not repeated among its knobs."""
    if missing(method):
        return cut(precision_label(dtype)) + knob_suffix(tuple((k, v) for k, v in extra if k != "dtype"))
    return f"{cut(method)} {cut(setting)}" + knob_suffix(extra)


def shown_knobs(families: list, extras: list[tuple]) -> list[tuple]:
    """Per cell, the splitting knobs worth printing in its label: those whose value differs
    between cells of the same family (a column's method and setting, a line's method and target). A
    weight-only column is not labelled with a KV knob that split only the KV columns."""
    values: dict = {}
    for family, extra in zip(families, extras):
        for k, v in extra:
            values.setdefault((family, k), set()).add(repr(v))
    return [tuple((k, v) for k, v in extra if len(values[(family, k)]) > 1)
            for family, extra in zip(families, extras)]


def cell_labels(methods, settings, extras, dtypes) -> list[str]:
    """Column labels of cells: method and setting (dtype label for a baseline), and the knobs
    that tell the cells of one column family apart."""
    families = [(None if missing(m) else m, s) for m, s in zip(methods, settings)]   # baselines: one family
    shown = shown_knobs(families, list(extras))
    return [column_label(m, s, e, d) for m, s, e, d in zip(methods, settings, shown, dtypes)]


def _runs(g: pd.DataFrame) -> int:
    return g["run_dir"].nunique() if "run_dir" in g and g["run_dir"].notna().any() else len(g)


def _samples(g: pd.DataFrame) -> str:
    if "n" not in g or g["n"].isna().all():
        return ""
    return ",".join(f"{int(x)}" if float(x).is_integer() else f"{x:g}" for x in sorted(g["n"].dropna().unique()))


def aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per cell of assigned headline rows: mean value, how many runs, their range, the
    samples per run (``n``), the runs' directories, and the difference to its baseline."""
    out = []
    for cell, g in rows.groupby("cell", sort=False):
        model, method, setting, extra = cell
        first = g.iloc[0]
        out.append({"task": first["task"], "metric": first["metric"], "model": model, "method": method,
                    "setting": setting, "target": first["target"], "bits": first["bits"],
                    "a_bits": first["a_bits"], "kv_budget": first["kv_budget"], "dtype": first["dtype"],
                    "zero_point": first.get("zero_point"),
                    "extra": extra,
                    "base_knobs": first["base_knobs"], "value": g["value"].mean(), "runs": _runs(g),
                    "lo": g["value"].min(), "hi": g["value"].max(), "samples": _samples(g),
                    "knobs": "; ".join(f"{k}={v}" for k, v in first["knobs"]),
                    "run_dirs": " ".join(sorted(map(str, g["run_dir"].dropna().unique()))) if "run_dir" in g else ""})
    cells = pd.DataFrame(out)
    if cells.empty:
        return cells
    cells["label"] = distinct(cells, cell_labels(cells["method"], cells["setting"], cells["extra"], cells["dtype"]))
    # a line of a figure runs over one method's settings of one target: labelled by what differs there
    cells["line_extra"] = shown_knobs(list(zip(cells["method"].fillna(""), cells["target"])), list(cells["extra"]))
    return with_baselines(cells)


def distinct(cells: pd.DataFrame, labels: list[str]) -> list[str]:
    """``labels`` with ``#2``, ``#3`` ... after a label that two cells of one model share (names
    cut to a label's length, or knob values that print alike: ``1`` and ``"1"``), so that no two
    cells ever share a table cell."""
    seen: dict[tuple, int] = {}
    out = []
    for model, label in zip(cells["model"], labels):
        seen[(model, label)] = n = seen.get((model, label), 0) + 1
        out.append(label if n == 1 else f"{label} #{n}")
    return out


def with_baselines(cells: pd.DataFrame) -> pd.DataFrame:
    """Each quantized cell's baseline: the full-precision cell of its model with exactly its
    non-quantization knobs (value, label, difference); None where there is none."""
    base = cells[cells["method"].isna()]
    lookup = {(m, bk): (v, lab) for m, bk, v, lab in zip(base["model"], base["base_knobs"], base["value"], base["label"])}
    found = [None if missing(meth) else lookup.get((m, bk))
             for m, meth, bk in zip(cells["model"], cells["method"], cells["base_knobs"])]
    cells = cells.copy()
    cells["baseline"] = [f[0] if f else None for f in found]
    cells["baseline_label"] = [f[1] if f else None for f in found]
    cells["delta"] = [v - f[0] if f else None for v, f in zip(cells["value"], found)]
    return cells


def task_cells(h: pd.DataFrame, task: str) -> tuple[pd.DataFrame, list[str]]:
    """The cells of one task's headline rows, and the knobs that split them."""
    rows, split = assign(h, {task})
    return aggregate(rows), split
