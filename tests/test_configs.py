"""Compose every config option, expand every experiment into its cells, and turn the SLURM
launcher config into the sbatch script submitit would submit (no cluster needed)."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qeval.sweep import expand
from qeval.validate import CONFIG_DIR, options

EXPERIMENTS = options("experiment")
STUDIES = ("qllm_eval_w", "qllm_eval_wa", "qllm_eval_kv", "kivi", "gear", "h2o")


def _compose(overrides, hydra_cfg=False):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def cells(experiment: str, *cli: str) -> list:
    """Every cell's composed config, expanded exactly as the basic sweeper expands them."""
    return [_compose(cell) for cell in expand([f"experiment={experiment}", *cli])]


@pytest.mark.parametrize("group", ["model", "method", "task"])
def test_every_option_of_every_group_composes(group):
    for option in options(group):
        cfg = _compose([f"{group}={option}"])
        node = cfg[group] if group != "task" else cfg.task[option]
        assert node is not None, (group, option)
        if group in ("model", "method"):
            assert cfg[group].name == option, f"{group}/{option}.yaml: name must equal the file name"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_is_a_sweep(experiment):
    top = _compose([f"experiment={experiment}"], hydra_cfg=True)
    assert str(top.hydra.mode).endswith("MULTIRUN"), f"{experiment}: an experiment is a sweep"


def test_every_study_has_an_experiment_and_a_smoke_variant():
    for study in STUDIES:
        assert study in EXPERIMENTS and f"{study}_smoke" in EXPERIMENTS


def _grid(cfgs, *keys) -> set:
    return {tuple(OmegaConf.select(c, k) for k in keys) for c in cfgs}


# what each study sweeps, as (keys, expected set of values); the smoke variant must sweep the same
GRIDS = {
    "qllm_eval_w": (("method.name", "method.zero_point", "w_bits", "a_bits", "kv_bits", "w_group_size"),
                    {("group", "integer", b, 16, 16, 128) for b in (2, 3, 4, 8, 16)}),
    # weights in groups of 128, activations per token (a_group_size null), as Qllm-Eval's WALinear
    "qllm_eval_wa": (("method.name", "method.zero_point", "w_bits", "a_bits", "kv_bits", "w_group_size",
                      "a_group_size"),
                     {("group", "integer", w, a, 16, 128, None) for w, a in ((8, 8), (4, 8), (4, 4), (16, 16))}),
    "qllm_eval_kv": (("method.name", "method.zero_point", "w_bits", "kv_bits", "kv_semantics", "kv_group_size"),
                     {("group", "integer", 16, b, "simulated", None) for b in (2, 3, 4, 8, 16)}),
    "kivi": (("method.name", "kv_bits"), {("kivi", b) for b in (2, 4, 16)}),
    "gear": (("method.name", "kv_bits"), {(m, b) for m in ("uniform", "group", "kivi", "gear") for b in (2, 4, 16)}),
    "h2o": (("method.name", "method.heavy_ratio", "method.recent_ratio"),
            {("h2o", r, r) for r in (0.05, 0.1, 0.15, 0.2, 0.25, 0.5)}),
}
TASKS = {"qllm_eval_w": {"mmlu", "gsm8k", "bbh", "longbench", "passkey"}, "kivi": {"gsm8k", "longbench", "passkey"},
         "gear": {"gsm8k_cot", "bbh"}, "h2o": {"gsm8k", "longbench", "passkey"}}
TASKS["qllm_eval_wa"] = TASKS["qllm_eval_kv"] = TASKS["qllm_eval_w"]


@pytest.mark.parametrize("study", STUDIES)
def test_study_sweeps_the_papers_grid_and_smoke_runs_the_same_grid_on_the_toy_model(study):
    keys, expected = GRIDS[study]
    top = _compose([f"experiment={study}"], hydra_cfg=True)
    models = str(top.hydra.sweeper.params.model).split(",")
    assert len(models) >= 4 and set(models) <= set(options("model")), "a study runs several known models"
    full = cells(study, f"model={models[0]}")  # one model's cells; the grid is the same for each
    assert _grid(full, *keys) == expected and len(full) == len(expected)
    assert all(set(c.task) == TASKS[study] for c in full)

    smoke = cells(f"{study}_smoke")
    assert _grid(smoke, *keys) == expected
    assert len(smoke) == len(expected)
    for c in smoke:
        assert c.model.name == "toy" and c.device == "cpu" and list(c.task) == ["passkey"]
        assert max(c.task.passkey.lengths) <= 512 and c.task.passkey.samples_per_cell == 1


@pytest.mark.parametrize("study", STUDIES)
def test_every_smoke_cell_passes_validation(study):
    from qeval.run import validate
    for c in cells(f"{study}_smoke"):
        validate(c)  # raises ConfigError naming the key if a cell asks for something impossible


def test_a_swept_key_on_the_command_line_replaces_the_experiments_list():
    trimmed = cells("qllm_eval_w", "model=llama2-7b", "w_bits=4,16")
    assert _grid(trimmed, "model.name", "w_bits") == {("llama2-7b", 4), ("llama2-7b", 16)}


def test_expand_a_smoke_experiment_with_the_command_line():
    # kivi_smoke sweeps model: toy, kv_bits: 2,4,16, task: passkey (in that order)
    assert expand(["experiment=kivi_smoke"]) == [
        ["model=toy", f"kv_bits={b}", "task=passkey", "experiment=kivi_smoke"] for b in (2, 4, 16)]
    # the command line's kv_bits replaces the experiment's list in its place, in the command line's
    # order; choice(...) sweeps like a,b; a plain key is in every cell
    two = [["model=toy", f"kv_bits={b}", "task=passkey", "experiment=kivi_smoke", "device=cpu"] for b in (16, 2)]
    assert expand(["experiment=kivi_smoke", "kv_bits=16,2", "device=cpu"]) == two
    assert expand(["experiment=kivi_smoke", "kv_bits=choice(16,2)", "device=cpu"]) == two
    assert expand(["experiment=kivi_smoke", "kv_bits=4"]) == [
        ["model=toy", "kv_bits=4", "task=passkey", "experiment=kivi_smoke"]]
    assert [c.kv_bits for c in cells("kivi_smoke", "kv_bits=16,2")] == [16, 2]
    # with the params given (what a Hydra callback has), nothing is composed
    assert expand(["kv_bits=4,2", "seed=1"], params={"model": "a,b"}) == [
        ["model=a", "kv_bits=4", "seed=1"], ["model=a", "kv_bits=2", "seed=1"],
        ["model=b", "kv_bits=4", "seed=1"], ["model=b", "kv_bits=2", "seed=1"]]
    assert expand([], params={}) == [[]]


def test_local_launcher_is_submitit_local():
    from hydra.utils import instantiate
    cfg = _compose(["hydra/launcher=local"], hydra_cfg=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.qeval_launchers.LocalLauncher"
    launcher = instantiate(cfg.hydra.launcher)
    # the plugin's launcher, apart from how it collects a killed cell's result (by name: Hydra's
    # plugin scan may load the plugin module a second time, so the class objects can differ)
    assert "BaseSubmititLauncher" in {c.__name__ for c in type(launcher).__mro__}
    assert launcher._EXECUTOR == "local"
    assert cfg.hydra.callbacks.sweep_summary._target_ == "qeval.sweep.callback.SweepSummary"


def test_slurm_launcher_becomes_a_valid_sbatch_script(monkeypatch, tmp_path):
    import shutil

    from hydra.utils import instantiate
    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8",
                    "hydra.launcher.timeout_min=90", "hydra.launcher.array_parallelism=4",
                    "hydra.launcher.setup=[module load cuda]", f"hydra.launcher.submitit_folder={tmp_path}"],
                   hydra_cfg=True)
    launcher = instantiate(cfg.hydra.launcher)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")  # no cluster here
    executor = launcher.executor()   # what launch() submits with
    script = executor._executor._make_submission_file_text("python -m qeval", "0")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=8", "#SBATCH --time=90",
                 "module load cuda", "#SBATCH --mem=64GB"):
        assert line in script, (line, script)


@pytest.mark.parametrize("name", ["qwen2.5-7b", "qwen3-8b", "llama3.1-8b", "gemma2-9b", "gemma3-12b", "mixtral-8x7b",
                                  "qwen3-30b-a3b"])
def test_todays_model_configs_resolve_and_offline_name_the_prefetch_that_fetches_them(name, tmp_path):
    # HF_HUB_OFFLINE (tests/conftest.py): no checkpoint here, so validation stops before any load
    from qeval.errors import ConfigError
    from qeval.validate import validate
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={name}", f"results_dir={tmp_path}"])
    assert cfg.model.name == name and "/" in cfg.model.path
    with pytest.raises(ConfigError, match=rf"python -m qeval.prefetch model={re.escape(name)}`"):
        validate(cfg)
