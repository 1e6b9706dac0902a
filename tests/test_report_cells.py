"""The report never averages different settings: runs that differ in any knob of their resolved
config are separate cells, named by the knobs that split them; a cell of several identical runs
says n=k; failed runs land in failed.md and never crash the report; the baseline is labelled by
its dtype; published numbers appear beside a matching cell only.

Runs are written without a model (``write``): rows as :func:`qeval.run.run` writes them (labels,
flat knobs and the nested resolved ``config``), so any mix of settings is cheap to build."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

from qeval import results
from qeval.methods.base import bit_labels
from qeval.report.__main__ import report
from qeval.report.cells import task_cells
from qeval.report.gather import gather, headline
from qeval.report.published import load

CONFIG = {
    "model": {"name": "toy", "path": "@toy", "revision": None, "trust_remote_code": False},
    "method": {"name": "uniform", "symmetric": False, "w_granularity": "per_channel",
               "a_granularity": "per_token", "kv_granularity": "per_token"},
    "task": {"passkey": {"lengths": [256, 512], "depths": [0.0, 1.0], "samples_per_cell": 2, "seed": 0}},
    "w_bits": 16, "a_bits": 16, "kv_bits": 16, "k_bits": None, "v_bits": None,
    "w_group_size": 128, "a_group_size": None, "kv_group_size": None, "kv_semantics": "cache",
    "device": "auto", "dtype": "auto", "attn": "sdpa", "backend": "auto", "seed": 0,
    "results_dir": "results", "force": False, "resume": "skip",
}


def merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied; dotted keys reach into nested dicts."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        node, *path = key.split(".")[::-1]
        where = out
        for part in reversed(path):
            where = where.setdefault(part, {})
        where[node] = value
    return out


def write(root: Path, value: float | None = 0.5, *, model: str = "toy", method: str = "uniform",
          task: str = "passkey", metric: str = "accuracy", dtype: str | None = "float32",
          status: str = "ok", error: str | None = None, n: int = 30, name: str | None = None,
          details: list[dict] = (), columns: dict | None = None, **changes) -> Path:
    """One finished run under ``root/runs``: a headline row (plus ``details`` breakdown rows).
    ``changes`` are config keys (dotted for nested ones: ``method.kv_granularity``), ``columns``
    more row columns (KV bytes, say); the run's directory is its config hash, or ``name`` to write
    the same config twice."""
    config = merged(CONFIG, {"model.name": model, "method.name": method, **changes})
    if task not in config["task"]:
        config["task"] = {task: {"seed": 0}}
    run_id = results.config_hash(config)
    bits = {k: config[k] for k in ("w_bits", "a_bits", "kv_bits")}
    w, a, kv = bits.values()
    target, setting = (bit_labels(w, a, kv, kv) if all(isinstance(b, int) for b in (w, a, kv))
                       else (None, None))
    base = {"run_id": run_id, "model": model, "method": method,
            **{f"method.{k}": v for k, v in config["method"].items() if k != "name"},
            "target": target, "setting": setting, "kv_budget": None, **bits, "k_bits": kv, "v_bits": kv,
            "kv_semantics": config["kv_semantics"], "dtype": dtype, "seed": config["seed"],
            "config_hash": run_id, "config": config, "task": task, "status": status, **(columns or {})}
    if status == "failed":
        rows = [base | {"metric": None, "value": None, "error": error}]
    else:
        rows = [base | {"metric": metric, "value": value, "n": n}]
        rows += [base | {"metric": metric, "n": 2} | d for d in details]
    run_dir = root / "runs" / (name or run_id)
    results.write_run(run_dir, {"run_id": run_id, "status": status, "error": error, "rows": rows}, rows,
                      "unused: true\n")
    return run_dir


def tables(root: Path) -> Path:
    report(root)
    return root / "report" / "tables"


def header(md: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith("| model |"))
    return [c.strip() for c in line.strip("|").split("|")]


def row(md: str, model: str) -> dict[str, str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {model} |"))
    return dict(zip(header(md), (c.strip() for c in line.strip("|").split("|"))))


def test_runs_differing_only_in_kv_semantics_are_two_cells_and_the_table_says_so(tmp_path):
    write(tmp_path, 1.0)
    write(tmp_path, 0.4, kv_bits=2)
    write(tmp_path, 0.2, kv_bits=2, kv_semantics="simulated")
    md = (tables(tmp_path) / "passkey.md").read_text()
    assert "cells also differ in: kv_semantics" in md
    cells = row(md, "toy")
    assert cells["uniform KV2 [kv_semantics=cache]"] == "0.4 (-0.6)"
    assert cells["uniform KV2 [kv_semantics=simulated]"] == "0.2 (-0.8)"
    assert "0.3" not in md, "two settings were averaged"
    assert "kv_semantics" not in header(md)[1], "a baseline is not split by what does nothing at 16 bits"


def test_a_column_is_labelled_only_by_the_knobs_that_differ_within_it(tmp_path):
    write(tmp_path, 1.0)
    write(tmp_path, 0.4, kv_bits=2)
    write(tmp_path, 0.2, kv_bits=2, kv_semantics="simulated")
    write(tmp_path, 0.8, w_bits=4)
    md = (tables(tmp_path) / "passkey.md").read_text()
    assert header(md) == ["model", "fp32", "uniform W4", "uniform KV2 [kv_semantics=cache]",
                          "uniform KV2 [kv_semantics=simulated]"]


def test_every_differing_knob_splits_and_identity_knobs_are_not_repeated(tmp_path):
    write(tmp_path, 0.4, kv_bits=2)
    write(tmp_path, 0.3, kv_bits=2, **{"method.kv_granularity": "per_tensor"})
    write(tmp_path, 0.2, kv_bits=2, **{"task.passkey.lengths": [1024]})
    write(tmp_path, 0.6, kv_bits=4, seed=1)   # alone in its cell: its seed needs no mention
    cells, split = task_cells(headline(gather(tmp_path)), "passkey")
    assert split == ["method.kv_granularity", "task.passkey.lengths"]
    assert sorted(cells["value"]) == [0.2, 0.3, 0.4, 0.6] and (cells["runs"] == 1).all()
    labels = set(cells["label"])
    assert "uniform KV2 [method.kv_granularity=per_tensor, task.passkey.lengths=[256, 512]]" in labels
    assert "uniform KV2 [method.kv_granularity=per_token, task.passkey.lengths=[1024]]" in labels
    assert not any(k in label for label in labels for k in ("kv_bits", "model.name", "method.name", "seed"))


def test_different_seeds_are_different_cells(tmp_path):
    write(tmp_path, 0.4, kv_bits=2, seed=0)
    write(tmp_path, 0.2, kv_bits=2, seed=1)
    md = (tables(tmp_path) / "passkey.md").read_text()
    assert "cells also differ in: seed" in md
    assert {"uniform KV2 [seed=0]", "uniform KV2 [seed=1]"} <= set(header(md))


def test_a_cell_of_identical_runs_says_how_many(tmp_path):
    write(tmp_path, 1.0)
    write(tmp_path, 0.4, kv_bits=2, name="first")
    write(tmp_path, 0.6, kv_bits=2, name="again")   # the same config, run again elsewhere
    md = (tables(tmp_path) / "passkey.md").read_text()
    assert row(md, "toy")["uniform KV2"] == "0.5 (-0.5) [n=2 runs: 0.4–0.6]"
    assert "cells also differ in" not in md
    cells = pd.read_csv(tmp_path / "report" / "tables" / "cells.csv")
    kv2 = cells[cells["setting"] == "KV2"].iloc[0]
    assert kv2["runs"] == 2 and str(kv2["samples"]) == "30" and "first" in kv2["run_dirs"]


def test_full_precision_runs_of_any_method_are_one_baseline_and_deltas_need_matching_knobs(tmp_path):
    write(tmp_path, 1.0)
    write(tmp_path, 1.0, method="group", kv_semantics="simulated")
    write(tmp_path, 0.5, kv_bits=2)
    write(tmp_path, 0.25, kv_bits=4, **{"task.passkey.lengths": [1024]})  # no baseline with these lengths
    md = (tables(tmp_path) / "passkey.md").read_text()
    cells = row(md, "toy")
    assert cells["fp32"] == "1 [n=2 runs]"
    assert cells["uniform KV2"] == "0.5 (-0.5)"
    assert cells["uniform KV4"] == "0.25", "a difference to a baseline of other knobs"
    assert "no bracket: no full-precision run" in md


def test_the_baseline_is_labelled_by_its_dtype_and_split_by_it(tmp_path):
    write(tmp_path, 1.0, dtype="float32")
    write(tmp_path, 0.5, kv_bits=2, dtype="float32")
    md = (tables(tmp_path) / "passkey.md").read_text()
    assert "difference to fp32" in md and "fp32" in header(md) and "fp16" not in md
    write(tmp_path, 0.9, dtype="bfloat16", device="cuda")
    md = (tables(tmp_path) / "passkey.md").read_text()
    assert "cells also differ in: device, dtype" in md
    assert {"fp32 [device=auto]", "bf16 [device=cuda]"} <= set(header(md))
    # a column is labelled by the knobs that differ within it; the difference is to the fp32 run
    assert row(md, "toy")["uniform KV2"] == "0.5 (-0.5)"


def test_a_tiny_value_keeps_its_significant_digits(tmp_path):
    write(tmp_path, 0.0, task="quant_error", metric="logits_kl")
    write(tmp_path, 3.2e-05, task="quant_error", metric="logits_kl", kv_bits=4)
    md = (tables(tmp_path) / "quant_error.md").read_text()
    assert "quant_error (logits_kl)" in md and "accuracy" not in md
    assert row(md, "toy")["uniform KV4"] == "3.2e-05 (+3.2e-05)"
    assert "0.0000" not in md


def test_a_failed_run_never_crashes_the_report_and_is_listed(tmp_path):
    write(tmp_path, 1.0)
    write(tmp_path, 0.5, kv_bits=2)
    bad = write(tmp_path, status="failed", error="ConfigError: kv_bits=abc is not a bit width\nmore",
                kv_bits="abc")
    oom = write(tmp_path, status="failed", error="OutOfMemoryError: CUDA out of memory", kv_bits=2,
                kv_semantics="simulated")
    written = report(tmp_path)
    out = tmp_path / "report" / "tables"
    failed = (out / "failed.md").read_text()
    assert "### Failed runs (2)" in failed
    assert "ConfigError: kv_bits=abc is not a bit width |" in failed and "more" not in failed
    assert str(bad) in failed and str(oom) in failed
    # the knob that tells the failed run from the finished one of its cell
    assert "| toy | uniform | KV2 | passkey | kv_semantics=simulated | OutOfMemoryError" in failed
    assert (out / "all.md").read_text().startswith("Failed runs: 2")
    assert row((out / "passkey.md").read_text(), "toy")["uniform KV2"] == "0.5 (-0.5)"
    assert written["figures"], "figures are drawn from the finished runs"


def test_an_unreadable_run_is_named_and_skipped(tmp_path, capsys):
    write(tmp_path, 1.0)
    broken = write(tmp_path, 0.5, kv_bits=2)
    (broken / "rows.jsonl").write_text("{not json\n")
    report(tmp_path)
    assert str(broken / "rows.jsonl") in capsys.readouterr().err
    md = (tmp_path / "report" / "tables" / "passkey.md").read_text()
    assert header(md) == ["model", "fp32"]


def test_rows_without_a_nested_config_use_the_runs_config_yaml(tmp_path):
    run_dir = tmp_path / "runs" / "old"
    rows = [{"model": "toy", "method": "uniform", "w_bits": 16, "a_bits": 16, "kv_bits": 2, "task": "passkey",
             "metric": "accuracy", "value": 0.5, "status": "ok", "dtype": "float32"}]
    results.write_run(run_dir, {"status": "ok"}, rows, "seed: 7\nkv_semantics: cache\nresults_dir: x\n")
    df = gather(tmp_path)
    assert df["config.seed"].iloc[0] == 7 and "config.results_dir" not in df


def test_published_numbers_appear_beside_a_matching_cell_only(tmp_path):
    gsm8k = {"task": "gsm8k", "metric": "exact_match,strict-match", "model": "llama2-7b", "dtype": "float16"}
    write(tmp_path, 0.28, **gsm8k)
    # the paper's W4: groups of 128 with Qllm-Eval's integer zero point on an fp16 model
    write(tmp_path, 0.25, w_bits=4, method="group", **{"method.zero_point": "integer"}, **gsm8k)
    write(tmp_path, 0.21, w_bits=4, **{"method.zero_point": "integer"}, **gsm8k)  # per-channel: another W4
    write(tmp_path, 0.5, kv_bits=2)   # toy passkey: nothing published
    out = tables(tmp_path)
    assert not (out / "passkey_vs_paper.md").exists()
    vs = (out / "gsm8k_vs_paper.md").read_text()
    assert "| llama2-7b | fp16 | 0.28 | 0.2676 (26.76 %) | +0.0124 |" in vs
    assert "| llama2-7b | group W4 | 0.25 | 0.2517 (25.17 %) | -0.0017 |" in vs
    assert "uniform W4" not in vs and "0.21" not in vs, "a per-channel W4 is not the paper's W4"
    assert "Qllm-Eval (arXiv:2402.18158)" in vs and vs in (out / "all.md").read_text()

    other = tmp_path / "other"
    write(other, 0.25, w_bits=4, **(gsm8k | {"model": "llama2-13b"}))
    assert not (tables(other) / "gsm8k_vs_paper.md").exists()


def test_the_published_numbers_ship_with_the_package_under_qeval_labels():
    assert (resources.files("qeval.report") / "published.csv").is_file()
    paper = load()
    assert list(paper.columns) == ["model", "task", "setting", "value", "requires", "source"]
    labels = {bit_labels(4, 16, 16, 16)[1], bit_labels(3, 16, 16, 16)[1], bit_labels(8, 8, 16, 16)[1],
              bit_labels(4, 8, 16, 16)[1], bit_labels(16, 16, 4, 4)[1], bit_labels(16, 16, 3, 3)[1],
              bit_labels(16, 16, 16, 16)[0]}
    assert set(paper["setting"]) == labels
    assert paper.set_index("setting").loc["fp16", "value"] == 26.76


@pytest.mark.parametrize("setting,overrides", [
    ("fp16", ["experiment=qllm_eval_w", "w_bits=16"]),
    ("W4", ["experiment=qllm_eval_w", "w_bits=4"]),
    ("W3", ["experiment=qllm_eval_w", "w_bits=3"]),
    ("W8A8", ["experiment=qllm_eval_wa", "experiment/wa@_global_=w8a8"]),
    ("W4A8", ["experiment=qllm_eval_wa", "experiment/wa@_global_=w4a8"]),
    ("KV4", ["experiment=qllm_eval_kv", "kv_bits=4"]),
    ("KV3", ["experiment=qllm_eval_kv", "kv_bits=3"])])
def test_the_qllm_eval_studies_run_exactly_the_published_settings(setting, overrides):
    # the study configs and the published rows' requirements must agree, or the paper column of
    # a real study run would stay empty (or, worse, sit beside another setting)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from qeval.report.published import requirements
    from qeval.validate import CONFIG_DIR
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=llama2-7b", *overrides])
    knobs = {k: str(v) for k, v in results.flatten(OmegaConf.to_container(cfg, resolve=True)).items()}
    knobs["method"] = knobs.pop("method.name")
    row = load().set_index("setting").loc[setting]
    for key, want in requirements(row["requires"]).items():
        assert knobs.get(key) == want, (setting, key, knobs.get(key), want)
    assert bit_labels(cfg.w_bits, cfg.a_bits, cfg.kv_bits, cfg.kv_bits)[1 if setting != "fp16" else 0] == setting


def test_the_zero_point_convention_of_quantized_cells_is_in_the_table(tmp_path):
    write(tmp_path, 1.0)
    write(tmp_path, 0.4, kv_bits=2, method="group", columns={"zero_point": "integer"})
    write(tmp_path, 0.7, kv_bits=2, method="kivi", columns={"zero_point": "real"})
    md = (tables(tmp_path) / "passkey.md").read_text()
    assert "zero point: group integer, kivi real" in md


def test_block_formats_sit_at_their_storage_per_element_on_the_bits_axis(tmp_path):
    # mxfp4 and nvfp4 both have 4-bit elements: without their block scales (8 bits per 32 or per
    # 16 elements) they would share one x position and hide each other in the bits figure
    write(tmp_path, 0.5, w_bits=4, w_format="mxfp4", columns={"w_format": "mxfp4"})
    write(tmp_path, 0.6, w_bits=4, w_format="nvfp4", columns={"w_format": "nvfp4"})
    write(tmp_path, 0.7, w_bits=4, columns={"w_format": "int"})
    df = gather(tmp_path)
    assert sorted(df["bits"]) == [4, 4.25, 4.5]
