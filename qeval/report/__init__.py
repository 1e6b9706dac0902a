"""``python -m qeval.report [results-dir]``: every result row of a results directory, gathered into
one table, then the study's tables and figures.

* :mod:`qeval.report.gather`: rows of every run -> one DataFrame (+ Parquet and CSV), with the
  derived columns every table and figure groups by (target, setting, bits, budget).
* :mod:`qeval.report.tables`: Markdown and LaTeX tables, model x (method, setting) per task, with
  the difference to full precision.
* :mod:`qeval.report.figures`: Qllm-Eval-style accuracy against bit width, passkey length x depth
  heatmaps, KV bytes and memory per method, and kernel throughput/memory against batch size.
"""
