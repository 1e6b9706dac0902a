"""Download every model and dataset a run or sweep needs, on a machine with internet, so that
compute nodes without it can run offline (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1).

    python -m qeval.prefetch experiment=kivi                      # into the Hugging Face cache
    python -m qeval.prefetch model=llama2-7b task=[gsm8k,mmlu] --data-dir /shared/qeval-data
    python -m qeval.prefetch experiment=qllm_eval_kv --dry-run    # only list what is needed
    python -m qeval.prefetch method=awq w_bits=4 model=llama2-7b --data-dir /shared/qeval-data
    python -m qeval.prefetch calibration=gptq_wikitext2 --data-dir /shared/qeval-data

Arguments are the same overrides as ``python -m qeval`` (sweeps included: ``kv_bits=2,4``, and
an experiment's ``hydra.sweeper.params``). ``--data-dir`` also writes every split of every lm-eval
dataset as ``<dir>/<dataset_path>/<dataset_name>/<split>.jsonl``, and the perplexity tasks' split
(wikitext2, c4: ``qeval.data.corpus``) the same way, which is what ``task.<name>.data_dir=<dir>``
reads. The calibration data of a calibrated method (gptq, smoothquant, awq with bits below 16 and
no ``method.scales_file``; or any preset named by ``calibration=<preset>``) is fetched the same way,
written where ``calibration.data_dir=<dir>`` reads it (``qeval.calibration.data``): pile-val for
AWQ / SmoothQuant (``<dir>/mit-han-lab/pile-val-backup/default/validation.jsonl``), GPTQ's C4 shard
(``<dir>/allenai/c4/en/c4-train.00000-of-01024/train.jsonl``), WikiText-2 train
(``<dir>/Salesforce/wikitext/wikitext-2-raw-v1/train.jsonl``). Models with ``random_config`` or a
local ``path``, generated tasks (passkey, the toy tasks) and the toy model's calibration need nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cells(overrides: list[str]) -> list:
    """Every composed config of the sweep the overrides (and any experiment) describe."""
    from hydra import compose, initialize_config_dir

    from qeval import CONFIG_DIR
    from qeval.sweep import expand

    cell_overrides = expand(overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="prefetch"):
        return [compose("config", overrides=cell) for cell in cell_overrides]


def calibration_spec(cfg):
    """The calibration data a cell reads (a :class:`qeval.calibration.data.Spec`), or None."""
    from qeval.calibration import data, stage
    from qeval.recipe.build import build_recipe

    asked = cfg.calibration.name != data.AUTO
    try:   # the recipe's calibrated parts (a combination validation refuses reads nothing)
        recipe = build_recipe(cfg, fused_decode=True)
        view = recipe.calibration_view() if recipe.needs_calibration else None
    except Exception:
        view = None
    if not asked and (view is None or stage.scales_file(view)):
        return None
    spec = data.resolve(view if view is not None else cfg)
    return None if spec.sampling == "toy_documents" else spec


def needs(configs) -> tuple[set, dict, dict]:
    """(models as (path, revision), lm-eval tasks as qeval task name -> its config, and the single
    splits read as text: perplexity tasks' (task name -> its config) and calibration data's
    (``calibration=<preset>`` -> the corpus node it is read as))."""
    from qeval.calibration import data as calibration
    from qeval.model.loading import resolve_path
    from qeval.tasks.perplexity import TASKS as PERPLEXITY
    from qeval.tasks.perplexity import uses_toy_corpus

    models, tasks, texts = set(), {}, {}
    for cfg in configs:
        if (spec := calibration_spec(cfg)) is not None:
            texts[f"calibration={spec.preset}"] = calibration.source(spec)
        m = cfg.model
        if not m.get("random_config") and m.get("path") and not Path(resolve_path(m.path)).is_dir():
            models.add((m.path, m.get("revision")))
        for name, task_cfg in cfg.task.items():
            if task_cfg.get("lm_eval_tasks"):
                tasks[name] = task_cfg
            elif name in PERPLEXITY and not uses_toy_corpus(task_cfg):
                texts[name] = task_cfg
    return models, tasks, texts


def datasets_for(tasks: dict) -> dict[tuple[str, str | None], set[str]]:
    """(dataset_path, dataset_name) -> the splits lm-eval's configs name, over every leaf task."""
    import tempfile

    from qeval.tasks.lm_eval.tasks import SPLIT_KEYS, load_tasks

    out: dict[tuple[str, str | None], set[str]] = {}
    for name, task_cfg in tasks.items():
        cfg = task_cfg.copy()
        cfg.data_dir = None
        with tempfile.TemporaryDirectory() as tmp:
            _, leaves = load_tasks(name, cfg, Path(tmp))
        for leaf in leaves.values():
            key = (leaf["dataset_path"], leaf.get("dataset_name"))
            out.setdefault(key, set()).update(leaf[k] for k in SPLIT_KEYS if leaf.get(k))
    return out


def fetch_dataset(path: str, name: str | None, splits: set[str], data_dir: Path | None) -> None:
    import datasets

    ds = datasets.load_dataset(path, name)
    if data_dir is None:
        return
    folder = data_dir / path / (name or "default")
    folder.mkdir(parents=True, exist_ok=True)
    for split in sorted(splits & set(ds)):
        ds[split].to_json(str(folder / f"{split}.jsonl"), lines=True, force_ascii=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="qeval overrides, e.g. experiment=kivi or model=llama2-7b")
    p.add_argument("--data-dir", type=Path, default=None, help="also write datasets as JSON lines here")
    p.add_argument("--dry-run", action="store_true", help="list what is needed, download nothing")
    a = p.parse_args(argv)
    from qeval.data import corpus

    models, tasks, texts = needs(cells(a.overrides))
    data = datasets_for(tasks)
    # perplexity and calibration: one split each (WikiText-2's test for perplexity, train for GPTQ)
    split_of = {(corpus.dataset_label(c), c.split): c for c in texts.values()}
    for path, rev in sorted(models, key=str):
        print(f"model   {path}" + (f"@{rev}" if rev else ""))
    for (path, name), splits in sorted(data.items(), key=str):
        print(f"dataset {path}" + (f"/{name}" if name else "") + f"  [{', '.join(sorted(splits))}]")
    for task_cfg in split_of.values():
        print(f"dataset {corpus.dataset_label(task_cfg)}  [{task_cfg.split}]")
    if a.dry_run:
        return 0
    from huggingface_hub import snapshot_download

    for path, rev in sorted(models, key=str):
        snapshot_download(path, revision=rev)
    for (path, name), splits in sorted(data.items(), key=str):
        fetch_dataset(path, name, splits, a.data_dir.resolve() if a.data_dir else None)
    for task_cfg in split_of.values():
        if a.data_dir:
            corpus.write_local(task_cfg, a.data_dir.resolve())
        else:
            corpus.load_hub(task_cfg)   # into the Hugging Face cache
    print(f"prefetch: {len(models)} models, {len(data) + len(split_of)} datasets"
          + (f"; JSON lines under {a.data_dir}" if a.data_dir else ""))
    return 0
