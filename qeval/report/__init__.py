"""``python -m qeval.report [results-dir]``: every result row of a results directory, gathered into
one table, then the study's tables and figures.

The report is a faithfulness tool: researchers check its numbers against papers, so it never
averages runs of different settings. Every knob of a run's resolved config that differs between
runs of one (model, method, setting) splits that cell, and the table or legend says which knobs
did (rule and exceptions in :mod:`qeval.report.cells`).

* :mod:`qeval.report.gather`: rows of every run -> one DataFrame (+ Parquet and CSV), with the
  run's flattened config as ``config.<key>`` columns and the derived labels (target, setting,
  bits, budget). Runs are read defensively (:mod:`~qeval.report.runs`,
  :mod:`~qeval.report.safe_read`: regular files, size caps, a YAML alias budget) and each row is
  checked against :mod:`~qeval.report.schema`; what does not fit is named and skipped
  (:mod:`~qeval.report.skips`), never fatal.
* :mod:`qeval.report.escape`: every name is escaped for the format it lands in (Markdown, LaTeX,
  CSV cells against formula injection, file names, figure labels), long names cut.
* :mod:`qeval.report.cells`: which runs share a cell; its value, run count and baseline.
* :mod:`qeval.report.tables`: Markdown and LaTeX tables, model x (method, setting, knobs) per
  task, with the difference to full precision; ``cells.csv``; :mod:`qeval.report.failed` lists
  failed runs; :mod:`qeval.report.published` puts published numbers beside qeval's.
* :mod:`qeval.report.figures` (with :mod:`~qeval.report.heatmap`, :mod:`~qeval.report.memory`,
  :mod:`~qeval.report.bench`): Qllm-Eval-style metric against bit width, passkey length x depth
  heatmaps, KV bytes and memory per cell, and kernel throughput/memory against batch size; one
  colour per method everywhere (:mod:`qeval.report.style`).
"""
