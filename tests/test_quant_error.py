"""The quant_error diagnostics task: zero error when nothing is quantized, more error at fewer
bits, one row per layer and metric, no K/V rows for an evicting cache, and a full CLI run that
needs a separately loaded full-precision reference (simulated KV)."""

import json
import subprocess
import sys

from kv_method_helpers import make_handle
from omegaconf import OmegaConf

from qeval.tasks.quant_error import evaluate

CFG = OmegaConf.create({"text": None, "n_tokens": 64, "context_tokens": 40})


def _by_metric(rows):
    out = {}
    for r in rows:
        out.setdefault(r["metric"], {})[r.get("layer")] = r["value"]
    return out


def test_sixteen_bits_has_zero_error():
    rows = _by_metric(evaluate(make_handle("kivi", bits=16), CFG))
    assert set(rows) == {"k_rel_error", "v_rel_error", "attn_out_rel_error", "logits_kl"}
    assert all(v == 0 for m in rows.values() for v in m.values())


def test_error_grows_as_bits_shrink_and_rows_are_per_layer():
    r2 = _by_metric(evaluate(make_handle("kivi", bits=2, residual_length=16), CFG))
    r4 = _by_metric(evaluate(make_handle("kivi", bits=4, residual_length=16), CFG))
    assert sorted(r2["k_rel_error"]) == [0, 1]
    for metric in ("k_rel_error", "v_rel_error", "attn_out_rel_error"):
        for layer in (0, 1):
            assert 0 < r4[metric][layer] < r2[metric][layer], (metric, layer)
    assert 0 < r4["logits_kl"][None] < r2["logits_kl"][None]


def test_evicting_cache_reports_attention_and_logits_only():
    rows = _by_metric(evaluate(make_handle("h2o"), CFG))
    assert set(rows) == {"attn_out_rel_error", "logits_kl"}
    assert rows["logits_kl"][None] > 0


def test_cli_run_with_a_reloaded_reference(tmp_path):
    p = subprocess.run([sys.executable, "-m", "qeval", "model=tiny-random", "method=kivi", "kv_bits=2",
                        "kv_semantics=simulated", "task=quant_error", "task.quant_error.n_tokens=64",
                        "task.quant_error.context_tokens=40", f"results_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for f in tmp_path.glob("runs/*/rows.jsonl") for line in f.read_text().splitlines()]
    by = _by_metric(rows)
    assert all(r["status"] == "ok" for r in rows)
    assert len(by["k_rel_error"]) == 2 and all(v > 0.05 for v in by["k_rel_error"].values())
