"""Markdown and LaTeX tables: per task, model x (method, setting), each cell the headline value
and its difference to full precision of the same model on the same task and metric."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qeval.report.gather import baseline_of, headline

TARGET_ORDER = {"fp16": 0, "W": 1, "WA": 2, "KV": 3, "KV-evict": 4, "mixed": 5}


def _columns(h: pd.DataFrame) -> list[tuple[str, str]]:
    """(method, setting) pairs in reading order: target, then method, then bits high to low."""
    cols = (h[h["target"] != "fp16"]
            .assign(_t=lambda d: d["target"].map(TARGET_ORDER), _b=lambda d: -d["bits"],
                    _k=lambda d: -d["kv_budget"].fillna(0))
            .sort_values(["_t", "method", "_b", "_k", "a_bits"], ascending=[True, True, True, True, False])
            [["method", "setting"]].drop_duplicates())
    return list(cols.itertuples(index=False, name=None))


def task_table(h: pd.DataFrame) -> pd.DataFrame:
    """One task's headline rows -> a frame of display strings, index = model."""
    base = baseline_of(h).set_index("model")["fp16_value"] if (h["target"] == "fp16").any() else pd.Series(dtype=float)
    cells = h[h["target"] != "fp16"].groupby(["model", "method", "setting"])["value"].mean()
    models = sorted(h["model"].unique())
    out = pd.DataFrame(index=pd.Index(models, name="model"))
    out["fp16"] = [f"{base[m]:.4f}" if m in base.index else "–" for m in models]
    for method, setting in _columns(h):
        col = []
        for m in models:
            v = cells.get((m, method, setting))
            if v is None or pd.isna(v):
                col.append("–")
            elif m in base.index:
                col.append(f"{v:.4f} ({v - base[m]:+.4f})")
            else:
                col.append(f"{v:.4f}")
        out[f"{method} {setting}"] = col
    return out


def to_markdown(t: pd.DataFrame, title: str) -> str:
    header = ["model", *t.columns]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(t.columns)) + "|"]
    for model, row in t.iterrows():
        lines.append("| " + " | ".join([str(model), *row.tolist()]) + " |")
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    return (str(s).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%")
            .replace("&", r"\&").replace("#", r"\#").replace("–", "--"))


def to_latex(t: pd.DataFrame, caption: str, label: str) -> str:
    cols = "l" + "r" * len(t.columns)
    head = " & ".join(["model", *map(_tex, t.columns)]) + r" \\"
    body = [" & ".join([_tex(m), *map(_tex, row.tolist())]) + r" \\" for m, row in t.iterrows()]
    return "\n".join([r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{cols}}}",
                      r"\toprule", head, r"\midrule", *body, r"\bottomrule", r"\end{tabular}",
                      rf"\caption{{{_tex(caption)}}}", rf"\label{{{label}}}", r"\end{table}"]) + "\n"


def write_tables(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``tables/<task>.md`` and ``.tex`` per task, and ``tables/all.md`` with every task."""
    out_dir.mkdir(parents=True, exist_ok=True)
    h = headline(df)
    written, sections = [], []
    for task, g in sorted(h.groupby("task"), key=lambda kv: kv[0]):
        metric = g["metric"].iloc[0]
        t = task_table(g)
        title = f"{task} ({metric}); in brackets: difference to fp16"
        md = to_markdown(t, title)
        sections.append(md)
        safe = task.replace("/", "_").replace(",", "_")
        (out_dir / f"{safe}.md").write_text(md)
        (out_dir / f"{safe}.tex").write_text(to_latex(t, f"{task}: {metric} per model and quantization "
                                                         f"setting; in brackets the difference to fp16.",
                                                      f"tab:{safe}"))
        written += [out_dir / f"{safe}.md", out_dir / f"{safe}.tex"]
    (out_dir / "all.md").write_text("\n".join(sections) if sections else "No finished rows.\n")
    return written + [out_dir / "all.md"]
