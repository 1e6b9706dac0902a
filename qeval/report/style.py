"""How the report writes things down: numbers, metric names, the full-precision label, and the
colour, marker and line style of every series.

* Numbers keep four significant digits (``.4g``), so a reconstruction error of 3e-05 is never
  printed as ``0.0000``.
* The full-precision baseline is labelled by the dtype it ran in (``fp32``, ``bf16``, ``fp16``):
  rows keep the internal target ``fp16`` (a key elsewhere), only what is displayed changes.
* A method's colour is fixed for the whole report: the methods of every quantized row, sorted,
  take the palette in order. Full-precision runs are drawn in one neutral colour, whatever method
  they ran under, so a model with or without a baseline run never shifts another method's colour.
  Markers follow the sorted models and line styles the sorted knob variants, the same way.
"""

from __future__ import annotations

import math

import pandas as pd

from qeval.report.escape import cut

# the dtype a full-precision run ran in -> its label in tables, legends and axis ticks
PRECISION_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
BASELINE_COLOUR = "dimgray"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINE_STYLES = ("-", "--", ":", "-.")
# what a task's headline metric measures, for axis labels (unit in brackets); others say "value"
METRIC_UNITS = {
    "accuracy": "accuracy (fraction)",
    "logits_kl": "logits_kl: KL divergence to full precision (nats)",
    "k_rel_error": "k_rel_error: relative error of keys (ratio)",
    "v_rel_error": "v_rel_error: relative error of values (ratio)",
    "attn_out_rel_error": "attn_out_rel_error: relative error (ratio)",
    "perplexity": "perplexity: exp(mean NLL per token)",
    "nll": "nll: mean NLL per token (nats)",
    "word_perplexity": "word_perplexity: exp(-log-likelihood / words)",
    "byte_perplexity": "byte_perplexity: exp(-log-likelihood / bytes)",
    "bits_per_byte": "bits_per_byte: -log2-likelihood / bytes (bits)",
}
# metrics (lm-eval's without their ",<filter>") for which a smaller number is the better model:
# a positive difference to full precision is a loss
LOWER_IS_BETTER = frozenset({"perplexity", "nll", "word_perplexity", "byte_perplexity", "bits_per_byte",
                             "logits_kl", "k_rel_error", "v_rel_error", "attn_out_rel_error"})
# lm-eval metric names "<metric>,<filter>": these metrics are fractions of examples
FRACTION_METRICS = ("acc", "acc_norm", "exact_match", "score")


def missing(x) -> bool:
    """None or NaN (pandas stores a missing method or dtype either way)."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def num(x) -> str:
    """A value with four significant digits; an en dash for a missing one."""
    if missing(x):
        return "–"
    return f"{float(x):.4g}"


def signed(x) -> str:
    """A difference with its sign and four significant digits."""
    return f"{float(x):+.4g}"


def precision_label(dtype) -> str:
    """``float32`` -> ``fp32``; an unknown or missing dtype says "full precision"."""
    if missing(dtype):
        return "full precision"
    return PRECISION_LABELS.get(str(dtype), str(dtype))


def baseline_label(dtypes) -> str:
    """One label for the baselines of a table or panel: ``fp32``, or ``fp32/bf16`` when they differ."""
    labels = sorted({precision_label(d) for d in dtypes})
    return "/".join(labels) if labels else "full precision"


def lower_is_better(metric) -> bool:
    return str(metric).split(",")[0] in LOWER_IS_BETTER


def direction(metric) -> str:
    """``", lower is better"`` for a metric where smaller is better, else nothing (higher is)."""
    return ", lower is better" if lower_is_better(metric) else ""


def metric_label(metric: str) -> str:
    """An axis label naming the metric actually plotted, with its unit (and its direction when
    lower is better)."""
    base = metric.split(",")[0]
    if metric in METRIC_UNITS or base in METRIC_UNITS:
        label = METRIC_UNITS.get(metric) or METRIC_UNITS[base]
    elif base in FRACTION_METRICS:
        label = f"{metric} (fraction)"
    else:
        label = f"{metric} (value)"
    return label + direction(metric).replace(", ", "; ")


def knob_suffix(extra) -> str:
    """`` [kv_semantics=simulated, seed=1]`` for a cell's distinguishing knobs; empty without any.
    Knobs a run does not have (another method's parameter) are left out."""
    shown = [f"{cut(k)}={cut(v)}" for k, v in extra if v is not None]   # a knob's value may be huge
    return f" [{', '.join(shown)}]" if shown else ""


def palette(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def method_colours(df: pd.DataFrame) -> dict:
    """Method -> colour from the sorted methods of every quantized row of the report."""
    if df.empty or "method" not in df:
        return {}
    methods = sorted({str(m) for m in df.loc[df["target"] != "fp16", "method"].dropna()})
    return dict(zip(methods, palette(len(methods))))


def model_markers(df: pd.DataFrame) -> dict:
    models = sorted({str(m) for m in df["model"].dropna()}) if "model" in df else []
    return {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(models)}


class Style:
    """Colour per method, marker per model, line style per knob variant: one instance per report,
    handed to every figure, so a method looks the same in every panel."""

    def __init__(self, df: pd.DataFrame):
        self.colours = method_colours(df)
        self.markers = model_markers(df)
        self.variants: dict[tuple, str] = {}

    def colour(self, method) -> str:
        return BASELINE_COLOUR if missing(method) else self.colours.get(str(method), BASELINE_COLOUR)

    def marker(self, model) -> str:
        return self.markers.get(str(model), "o")

    def register_variants(self, extras) -> None:
        """Give every knob variant of the report its line style up front, in sorted order (the
        variant without extra knobs first, solid), so a variant keeps its style in every figure."""
        for extra in sorted(set(extras), key=lambda e: (len(e) > 0, repr(e))):
            self.line_style(extra)

    def line_style(self, extra: tuple) -> str:
        if extra not in self.variants:
            self.variants[extra] = LINE_STYLES[len(self.variants) % len(LINE_STYLES)]
        return self.variants[extra]

    def line(self, model, method, extra: tuple) -> dict:
        return {"color": self.colour(method), "marker": self.marker(model), "ls": self.line_style(extra)}
