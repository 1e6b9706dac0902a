"""Published numbers beside qeval's: ``published.csv`` (shipped with the package) holds results
from papers, one per (model, task, setting), with its source.

Columns: ``model`` (qeval's model name, e.g. ``llama2-7b``), ``task`` (qeval's task name),
``setting`` (as :func:`qeval.methods.base.bit_labels` writes it: ``W4``, ``W8A8``, ``KV3``; the
full-precision baseline is ``fp16``, its internal target), ``value``, ``requires`` and ``source``.
``requires`` names the knobs that make a qeval cell the paper's setting (``key=value`` separated by
``;``, ``method=`` for the method, any other key as the report's knobs spell it): Qllm-Eval's W4 is
round-to-nearest in groups of 128 with an integer zero point on an fp16 model, so a per-channel
``uniform W4`` cell is not set beside it.

Values are stored exactly as published, which for accuracy-like metrics is a percentage (Qllm-Eval
reports GSM8K accuracy as 26.76); qeval writes fractions in [0, 1], so a published value is
divided by 100 before it is shown beside or subtracted from qeval's. Only tasks whose headline
metric is a fraction are compared.

A table ``<task>_vs_paper`` lists every qeval cell whose (model, task, setting) has a published
number (several qeval cells may match one number: other methods or knobs of the same setting);
no table is written when nothing matches.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd

from qeval.report.escape import LABEL_CHARS, md
from qeval.report.style import FRACTION_METRICS, num, signed

PUBLISHED_CSV = "published.csv"
PERCENT = 100.0   # published accuracies are percentages; qeval's are fractions


def load(path: Path | None = None) -> pd.DataFrame:
    """The published numbers (the packaged ``published.csv`` unless a path is given)."""
    source = path if path is not None else resources.files("qeval.report") / PUBLISHED_CSV
    with source.open() as f:   # works for a file inside an installed package, too
        return pd.read_csv(f, dtype={"model": str, "task": str, "setting": str, "requires": str, "source": str},
                           keep_default_na=False, na_values={"value": [""]})


def requirements(text: str) -> dict[str, str]:
    """``"method=group; w_group_size=128"`` -> {"method": "group", "w_group_size": "128"}."""
    pairs = (p.strip().partition("=") for p in str(text or "").split(";") if p.strip())
    return {k.strip(): v.strip() for k, _, v in pairs}


def meets(cell, required: dict[str, str]) -> bool:
    """Whether a cell (its method and its ``knobs`` string) is the published setting."""
    knobs = requirements(cell["knobs"])
    for key, want in required.items():
        have = cell["method"] if key == "method" else knobs.get(key)
        if str(have) != want:
            return False
    return True


def _fraction_metric(metric: str) -> bool:
    return metric == "accuracy" or str(metric).split(",")[0] in FRACTION_METRICS


def beside_paper(cells: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """One line per qeval cell with a published number of the same (model, task, setting)."""
    if cells.empty or published.empty:
        return pd.DataFrame()
    cells = cells[cells["metric"].map(_fraction_metric)]
    matched = cells.merge(published.rename(columns={"value": "published"}),
                          on=["model", "task", "setting"], how="inner")
    if not matched.empty:
        matched = matched[[meets(r, requirements(r["requires"])) for _, r in matched.iterrows()]]
    if matched.empty:
        return pd.DataFrame()
    matched["paper"] = matched["published"] / PERCENT
    matched["difference"] = matched["value"] - matched["paper"]
    return matched


def to_markdown(matched: pd.DataFrame, task: str) -> str:
    metric = matched["metric"].iloc[0]
    lines = [f"### {md(task)} ({md(metric)}): qeval beside published numbers", "",
             (f"Published values are percentages as printed; shown here divided by {PERCENT:g} to "
              "compare with qeval's fractions."), "",
             "| model | qeval cell | qeval | paper | qeval − paper | runs | source |",
             "|---|---|---:|---:|---:|---:|---|"]
    for _, r in matched.iterrows():
        lines.append(f"| {md(r['model'], LABEL_CHARS)} | {md(r['label'])} | {num(r['value'])} | {num(r['paper'])} "
                     f"({r['published']:g} %) | {signed(r['difference'])} | {r['runs']} | {md(r['source'])} |")
    return "\n".join(lines) + "\n"
