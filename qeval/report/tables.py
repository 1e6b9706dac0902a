"""Markdown and LaTeX tables: per task, model x (method, setting, distinguishing knobs).

Cells follow :mod:`qeval.report.cells`: runs that differ in any knob are never averaged; a knob
that splits cells is named under the title and carried in the column labels. A cell reads

* ``0.8667 (-0.0333)``: the value and, in brackets, its difference to the full-precision run of
  the same model with the same non-quantization knobs (labelled by its dtype: fp32, bf16, fp16);
  no bracket when there is no such run;
* ``... [n=2 runs]``: the mean of two runs of identical settings; ``[n=2 runs: 0.8–0.9]`` when
  they disagree.

Numbers keep four significant digits. ``cells.csv`` holds every cell in long form (knobs, runs,
samples per run ``n``, run directories), ``failed.md`` the failed runs, ``<task>_vs_paper.md``
published numbers beside qeval's, and ``all.md`` all of it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qeval.report import escape, published
from qeval.report.cells import task_cells
from qeval.report.escape import LABEL_CHARS
from qeval.report.failed import failed_markdown, failed_runs
from qeval.report.gather import headline, neutralised
from qeval.report.style import baseline_label, direction, missing, num, signed

TARGET_ORDER = {"fp16": 0, "W": 1, "WA": 2, "KV": 3, "KV-evict": 4, "mixed": 5}


def column_order(cells: pd.DataFrame) -> list[str]:
    """Column labels in reading order: baselines, then by target, method, bits high to low."""
    c = cells.assign(_t=cells["target"].map(TARGET_ORDER).fillna(9), _b=-cells["bits"].fillna(16),
                     _k=-cells["kv_budget"].fillna(0), _a=-cells["a_bits"].fillna(16),
                     _m=cells["method"].fillna(""))
    c = c.sort_values(["_t", "_m", "_b", "_k", "_a", "label"], kind="stable")
    return list(dict.fromkeys(c["label"]))


def cell_text(c) -> str:
    text = num(c["value"])
    if not missing(c["delta"]):
        text += f" ({signed(c['delta'])})"
    if c["runs"] > 1:
        spread = f": {num(c['lo'])}–{num(c['hi'])}" if c["lo"] != c["hi"] else ""
        text += f" [n={c['runs']} runs{spread}]"
    return text


def task_table(cells: pd.DataFrame) -> pd.DataFrame:
    """One task's cells -> a frame of display strings, index = model."""
    models = sorted(cells["model"].astype(str).unique())
    out = pd.DataFrame(index=pd.Index(models, name="model"))
    for label in column_order(cells):
        col = cells[cells["label"] == label].set_index("model")
        out[label] = [cell_text(col.loc[m]) if m in col.index else "–" for m in models]
    return out


def notes(cells: pd.DataFrame, split: list[str]) -> list[str]:
    """The lines under a table's title: what split cells, samples per run, what has no baseline."""
    lines = []
    if split:
        lines.append("cells also differ in: " + ", ".join(split))
    samples = sorted({s for s in cells["samples"] if s})
    if len(samples) == 1:
        lines.append(f"samples per run (n): {samples[0]}")
    elif samples:
        lines.append("samples per run (n) differ between cells: " + "; ".join(samples) + " (see cells.csv)")
    quantized = cells[cells["method"].notna()]
    conventions = sorted({f"{m} {z}" for m, z in zip(quantized["method"], quantized["zero_point"]) if not missing(z)})
    if conventions:   # which grid the quantized numbers come from (Qllm-Eval's integer zero or KIVI's real one)
        lines.append("zero point: " + ", ".join(conventions))
    if quantized["baseline"].isna().any():
        lines.append("no bracket: no full-precision run of that model with the same non-quantization knobs")
    return lines


def title_of(task: str, cells: pd.DataFrame) -> str:
    """``task (metric)``, ``, lower is better`` where a smaller number is better (perplexity: a
    positive difference is then a loss), and what the brackets hold."""
    metric = cells["metric"].iloc[0]
    base = cells[cells["method"].isna()]
    title = f"{task} ({metric}){direction(metric)}"
    if base.empty:
        return title
    return f"{title}; in brackets: difference to {baseline_label(base['dtype'])}"


def to_markdown(t: pd.DataFrame, title: str, lines: list[str] = ()) -> str:
    """A Markdown table; every name is escaped (:func:`qeval.report.escape.md`) and a model name
    cut to a label's length, so no value can add a cell, a row or HTML."""
    header = ["model", *map(escape.md, t.columns)]
    out = [f"### {escape.md(title)}", ""] + [f"{escape.md(line)}  " for line in lines] + ([""] if lines else [])
    out += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(t.columns)) + "|"]
    for model, row in t.iterrows():
        out.append("| " + " | ".join([escape.md(model, LABEL_CHARS), *map(escape.md, row.tolist())]) + " |")
    return "\n".join(out) + "\n"


def to_latex(t: pd.DataFrame, caption: str, label: str) -> str:
    """A LaTeX table; every name escaped (:func:`qeval.report.escape.tex`)."""
    cols = "l" + "r" * len(t.columns)
    head = " & ".join(["model", *map(escape.tex, t.columns)]) + r" \\"
    body = [" & ".join([escape.tex(m, LABEL_CHARS), *map(escape.tex, row.tolist())]) + r" \\"
            for m, row in t.iterrows()]
    return "\n".join([r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{cols}}}",
                      r"\toprule", head, r"\midrule", *body, r"\bottomrule", r"\end{tabular}",
                      rf"\caption{{{escape.tex(caption)}}}", rf"\label{{{label}}}", r"\end{table}"]) + "\n"


def safe_name(task: str) -> str:
    """The file stem of a task's tables (:func:`qeval.report.escape.file_name`)."""
    return escape.file_name(task)


def tex_label(stem: str) -> str:
    """A ``\\label`` key: letters, digits and ``_.:-`` only."""
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_.:-") else "-" for ch in stem)


def write_task(task: str, cells: pd.DataFrame, split: list[str], out_dir: Path) -> tuple[str, list[Path]]:
    """``<task>.md`` and ``<task>.tex``; returns the Markdown and the files."""
    t = task_table(cells)
    title, lines = title_of(task, cells), notes(cells, split)
    md = to_markdown(t, title, lines)
    safe = safe_name(task)
    (out_dir / f"{safe}.md").write_text(md)
    caption = ". ".join([title.replace("; in brackets:", ". In brackets:"), *(x[0].upper() + x[1:] for x in lines)]) + "."
    (out_dir / f"{safe}.tex").write_text(to_latex(t, caption, f"tab:{tex_label(safe)}"))
    return md, [out_dir / f"{safe}.md", out_dir / f"{safe}.tex"]


def write_cells_csv(every_cell: list[pd.DataFrame], path: Path) -> Path:
    """Every cell of every task in long form: knobs, value, runs, samples, run directories."""
    cells = pd.concat(every_cell) if every_cell else pd.DataFrame(columns=["task", "extra", "base_knobs"])
    cells = cells.assign(extra=cells["extra"].map(lambda e: "; ".join(f"{k}={v}" for k, v in e)))
    neutralised(cells.drop(columns=["base_knobs"])).to_csv(path, index=False)
    return path


def write_tables(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per task ``<task>.md``/``.tex`` (and ``<task>_vs_paper.md`` where a published number
    matches), ``failed.md``, ``cells.csv`` and ``all.md`` with every table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    h = headline(df)
    paper = published.load()
    written, sections, every_cell = [], [], []
    for task, g in sorted(h.groupby("task"), key=lambda kv: kv[0]):
        cells, split = task_cells(g, task)
        md, files = write_task(task, cells, split, out_dir)
        sections.append(md)
        written += files
        every_cell.append(cells)
        matched = published.beside_paper(cells, paper)
        if not matched.empty:
            vs = published.to_markdown(matched, task)
            (out_dir / f"{safe_name(task)}_vs_paper.md").write_text(vs)
            sections.append(vs)
            written.append(out_dir / f"{safe_name(task)}_vs_paper.md")
    failed = failed_runs(df)
    (out_dir / "failed.md").write_text(failed_markdown(failed))
    cells_csv = write_cells_csv(every_cell, out_dir / "cells.csv")
    head = f"Failed runs: {len(failed)}" + (" (listed in failed.md and at the end)" if len(failed) else "") + "\n"
    body = "\n".join(sections) if sections else "No finished rows.\n"
    tail = ["", failed_markdown(failed)] if len(failed) else []
    (out_dir / "all.md").write_text("\n".join([head, body, *tail]))
    return written + [out_dir / "failed.md", cells_csv, out_dir / "all.md"]
