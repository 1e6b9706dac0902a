"""The table a sweep prints at its end: headline numbers per cell, labelled by what varies."""

import json

from qeval.sweep import comparison


def cell(tmp_path, job, overrides, rows, status="done"):
    d = tmp_path / f"run{job}"
    d.mkdir()
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"job": job, "overrides": overrides, "status": status, "run_dir": str(d)}


def test_comparison_keeps_headline_rows_and_varying_overrides(tmp_path):
    ok = lambda task, value, **kw: {"task": task, "metric": "accuracy", "value": value, "status": "ok", **kw}
    markers = [
        cell(tmp_path, 0, ["kv_bits=16", "results_dir=/x"], [ok("passkey", 1.0), ok("passkey", 0.5, length=256)]),
        cell(tmp_path, 1, ["kv_bits=2", "results_dir=/x"], [ok("passkey", 0.25), ok("toy_mc", 0.75)]),
        cell(tmp_path, 2, ["kv_bits=3", "results_dir=/x"], [ok("passkey", 0.9)], status="failed"),
    ]
    table = comparison(markers)
    lines = table.splitlines()
    assert "results_dir" not in table and "kv_bits=3" not in table  # shared knob hidden; failed cell left out
    row16 = next(l for l in lines if l.startswith("kv_bits=16"))
    row2 = next(l for l in lines if l.startswith("kv_bits=2 "))
    assert "1.000" in row16 and "0.500" not in row16  # the per-length detail row is not a headline
    assert "0.250" in row2 and "0.750" in row2


def test_comparison_says_what_every_cell_shares(tmp_path):
    """The demo's quiet per-tensor KV statistics are printed, not hidden."""
    ok = lambda bits: {"task": "passkey", "metric": "accuracy", "value": 1.0, "status": "ok", "model": "toy",
                       "method": "uniform", "method.kv_granularity": "per_tensor", "kv_bits": bits,
                       "kv_semantics": "cache"}
    markers = [cell(tmp_path, 0, ["kv_bits=16"], [ok(16)]), cell(tmp_path, 1, ["kv_bits=2"], [ok(2)])]
    first = comparison(markers).splitlines()[0]
    assert first.startswith("every cell: ") and "method.kv_granularity=per_tensor" in first
    assert "model=toy" in first and "kv_bits" not in first   # what varies is the row label, not shared
