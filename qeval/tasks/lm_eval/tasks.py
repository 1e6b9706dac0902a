"""GSM8K, MMLU, BBH, LongBench and WikiText through lm-eval, with the method's KV cache on the path.

lm-eval owns the prompts, few-shot examples, answer extraction and metrics (and their versions);
qeval owns the model (:class:`qeval.tasks.lm_eval.model.QevalLM`) and the rows. One qeval task is one
``simple_evaluate`` call over lm-eval task or group names (``cfg.lm_eval_tasks``).

Data: from the Hugging Face hub by default. ``data_dir`` points every leaf task at local JSON
lines instead, laid out as ``<data_dir>/<dataset_path>/<dataset_name or default>/<split>.jsonl``
(what ``python -m qeval.prefetch --data-dir`` writes); the redirect is a generated YAML per leaf task
that ``include``s lm-eval's own and swaps only the dataset (``dataset_path: json``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from qeval.errors import ConfigError
from qeval.results import write_atomic
from qeval.tasks import keys
from qeval.tasks.lm_eval.model import QevalLM
from qeval.tasks.lm_eval.task_yaml import entry_field, load_task_yaml

SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")


# ---------------------------------------------------------------------------- task tree
def leaf_configs(manager, names) -> dict[str, dict]:
    """Every leaf task under ``names`` (tasks, groups or tags) -> its merged YAML config
    (with ``yaml_path``), read without building anything (building downloads the data)."""
    out: dict[str, dict] = {}
    tags, groups = set(manager.all_tags), set(manager.all_groups)

    def visit(name: str) -> None:
        entry = manager.task_index.get(name)
        if entry is None:
            raise ConfigError(f"lm_eval_tasks={list(names)}: '{name}' is not an lm-eval task, group or tag")
        yaml_path = entry_field(entry, "yaml_path")
        if name in tags:
            for t in sorted(entry_field(entry, "tags") or ()):
                visit(t)
        elif name in groups:
            for item in load_task_yaml(yaml_path).get("task", []):
                visit(item if isinstance(item, str) else item.get("task") or item.get("group"))
        elif yaml_path is not None:
            out[name] = load_task_yaml(yaml_path) | {"yaml_path": str(yaml_path)}

    for n in names:
        visit(n)
    return out


def datasets_of(leaves: dict[str, dict]) -> list[tuple[str, str | None]]:
    return sorted({(c.get("dataset_path"), c.get("dataset_name")) for c in leaves.values()}, key=str)


def local_files(data_dir: Path, cfg: dict) -> Path:
    return data_dir / cfg["dataset_path"] / (cfg.get("dataset_name") or "default")


def needed_splits(cfg: dict, num_fewshot: int | None) -> list[str]:
    """The eval split, plus the split shots are drawn from unless they are inline: lm-eval reads
    that split when it builds the task, even at 0 shots (``ConfigurableTask.__init__`` calls
    ``fewshot_docs()``; wikitext's train split, say)."""
    need = [cfg.get("test_split") or cfg.get("validation_split")]
    inline = (cfg.get("fewshot_config") or {}).get("samples")
    if not inline:
        need.append(cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split"))
    return [s for s in need if s]


def write_local_overrides(leaves: dict[str, dict], data_dir: Path, out_dir: Path, key: str,
                          num_fewshot: int | None) -> None:
    """One YAML per leaf: lm-eval's config with the dataset swapped for local JSON lines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, cfg in leaves.items():
        folder = local_files(data_dir, cfg)
        for split in needed_splits(cfg, num_fewshot):
            if not (folder / f"{split}.jsonl").is_file():
                raise ConfigError(f"{key}={data_dir}: {folder / f'{split}.jsonl'} is missing (dataset "
                                  f"{cfg['dataset_path']}/{cfg.get('dataset_name')}, split {split}); "
                                  f"write it with `python -m qeval.prefetch {key.partition('.data_dir')[0].replace('.', '=', 1)} --data-dir {data_dir}`")
        files = {cfg[k]: str(folder / f"{cfg[k]}.jsonl") for k in SPLIT_KEYS
                 if cfg.get(k) and (folder / f"{cfg[k]}.jsonl").is_file()}
        override = {"include": cfg["yaml_path"], "task": name, "dataset_path": "json",
                    "dataset_name": None, "dataset_kwargs": {"data_files": files}}
        (out_dir / f"{name}.yaml").write_text(json.dumps(override, indent=1))  # JSON is YAML


def load_tasks(name: str, cfg, tmp: Path):
    """A TaskManager (local overrides included when ``data_dir`` is set) and the leaf configs.
    Nothing is built here: lm-eval builds (and downloads) inside ``simple_evaluate``."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    names = list(cfg.lm_eval_tasks)
    # indexing all of lm-eval's YAMLs takes tens of seconds; a task names the folders it needs
    root = Path(lm_eval.tasks.__file__).parent
    dirs = [str(root / d) for d in cfg.lm_eval_dirs] if cfg.get("lm_eval_dirs") else []
    manager = TaskManager(include_defaults=not dirs, include_path=dirs or None)
    try:
        leaves = leaf_configs(manager, names)
    except ConfigError as e:
        where = f" under lm_eval_dirs={list(cfg.lm_eval_dirs)}" if dirs else ""
        raise ConfigError(f"task.{name}.{e}{where}") from None
    if cfg.get("data_dir"):
        data_dir = Path(cfg.data_dir).expanduser().resolve()
        write_local_overrides(leaves, data_dir, tmp, f"task.{name}.data_dir", cfg.get("num_fewshot"))
        manager = TaskManager(include_defaults=not dirs, include_path=dirs + [str(tmp)])
    return manager, leaves


# ---------------------------------------------------------------------------- rows
def _n(results: dict, name: str) -> int:
    if name in results.get("n-samples", {}):
        return int(results["n-samples"][name]["effective"])
    return sum(_n(results, c) for c in results.get("group_subtasks", {}).get(name, []))


def _num(x):
    return float(x) if isinstance(x, (int, float)) else None


def rows_from_results(results: dict, scoring: str, leaves: dict[str, dict]) -> list[dict]:
    """One row per (lm-eval task or group, metric) with lm-eval's names, stderr and version."""
    rows = []
    for name, metrics in results["results"].items():
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len") or "_stderr," in key or key.endswith("_stderr"):
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            rows.append({"metric": key, "value": _num(value), "stderr": _num(stderr), "n": _n(results, name),
                         "subtask": name, "is_group": name not in leaves,
                         "task_version": results.get("versions", {}).get(name),
                         "num_fewshot": results.get("n-shot", {}).get(name), "scoring": scoring})
    return rows


def task_mean_row(rows: list[dict], metric: str, label: str) -> dict | None:
    """The unweighted mean of ``metric`` over leaf tasks (the LongBench paper's average)."""
    leaf = [r for r in rows if not r["is_group"] and r["metric"] == metric and r["value"] is not None]
    if not leaf:
        return None
    return {"metric": metric, "value": sum(r["value"] for r in leaf) / len(leaf), "stderr": None,
            "n": sum(r["n"] for r in leaf), "subtask": label, "is_group": True, "task_version": None,
            "num_fewshot": None, "scoring": leaf[0]["scoring"], "n_tasks": len(leaf)}


def sent_prompt(arguments) -> str | None:
    """The prompt of a logged generate_until sample (lm-eval logs ``{"gen_args_0": {"arg_0": ...}}``)."""
    if isinstance(arguments, dict) and arguments:
        first = next(iter(arguments.values()))
        return first.get("arg_0") if isinstance(first, dict) else None
    if isinstance(arguments, (list, tuple)) and arguments and isinstance(arguments[0], (list, tuple)):
        return arguments[0][0]
    return None


def write_samples(run_dir, qeval_task: str, results: dict, lm: QevalLM) -> None:
    """Per-sample predictions in ``<run_dir>/samples.jsonl``; lines of other qeval tasks kept."""
    if run_dir is None:
        return
    path = Path(run_dir) / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if path.exists():
        kept = [line for line in path.read_text().splitlines()
                if line and json.loads(line).get("qeval_task") != qeval_task]
    new = []
    for sub, samples in results.get("samples", {}).items():
        for s in samples:
            line = {"qeval_task": qeval_task, "lm_eval_task": sub} | s
            prompt = sent_prompt(s.get("arguments"))
            if isinstance(prompt, str) and prompt in lm.input_lengths:
                line["input_tokens"], line["input_tokens_truncated"] = lm.input_lengths[prompt]
            new.append(json.dumps(line, default=str))
    # a unique temporary name per writer (qeval.results.write_atomic), then an atomic rename
    write_atomic(path, "\n".join(kept + new) + "\n")


# ---------------------------------------------------------------------------- the task
def no_chat_filter(cfg):
    """LongBench's convention: no chat template for few-shot / code tasks (its pred.py list)."""
    if not cfg.get("chat_template", False):
        return None
    skip = set(cfg.get("no_chat_tasks") or [])
    return lambda task_name: not any(task_name == s or task_name.endswith(f"_{s}") for s in skip)


def missing_data_error(name: str, leaves: dict[str, dict], e: Exception) -> ConfigError:
    ds = datasets_of(leaves)
    shown = ", ".join(p + (f"/{n}" if n else "") for p, n in ds[:3]) + (f" (+{len(ds) - 3} more)" if len(ds) > 3 else "")
    return ConfigError(f"task={name}: dataset {shown} could not be loaded ({type(e).__name__}); run "
                       f"`python -m qeval.prefetch task={name}` where there is network, or set task.{name}.data_dir=<dir with "
                       f"<dataset_path>/<dataset_name>/<split>.jsonl>")


# lm-eval's own defaults (``lm_eval --seed``, ``simple_evaluate``): python's random, numpy, torch,
# and the few-shot sampler. The last decides which shots a randomly sampled task (GSM8K) shows.
LM_EVAL_SEEDS = (0, 1234, 1234, 1234)
SEED_SLOTS = ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")


def seeds(seed) -> dict:
    """``simple_evaluate``'s four seed arguments from the task's ``seed`` key, read as lm-eval's
    ``--seed`` is: one integer for all four, or four values (null leaves that generator alone)."""
    values = [seed] * 4 if isinstance(seed, int) else list(seed)
    return dict(zip(SEED_SLOTS, values))


def evaluate_lm_eval(name: str, handle, cfg) -> list[dict]:
    from datasets.exceptions import DatasetNotFoundError
    from lm_eval import simple_evaluate

    tmp = Path(tempfile.mkdtemp(prefix=f"qeval-{name}-"))
    try:
        manager, leaves = load_tasks(name, cfg, tmp)
        lm = QevalLM(handle, scoring=cfg.get("scoring", "prefill"), batch_size=cfg.batch_size,
                     max_length=cfg.get("max_length"), truncation=cfg.get("truncation", "left"),
                     max_input_tokens=cfg.get("max_input_tokens"), chat_template=no_chat_filter(cfg))
        gen = {"max_gen_toks": int(cfg.max_gen_toks)} if cfg.get("max_gen_toks") else None
        try:
            results = simple_evaluate(
                model=lm, tasks=list(cfg.lm_eval_tasks), task_manager=manager,
                num_fewshot=cfg.get("num_fewshot"), limit=cfg.get("limit"), gen_kwargs=gen,
                bootstrap_iters=cfg.get("bootstrap_iters", 100000), log_samples=True,
                **seeds(cfg.get("seed", LM_EVAL_SEEDS)))
        except (ConnectionError, FileNotFoundError, DatasetNotFoundError) as e:  # offline, not cached
            raise missing_data_error(name, leaves, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = rows_from_results(results, lm.scoring, leaves)
    if cfg.get("task_mean_metric"):
        mean = task_mean_row(rows, cfg.task_mean_metric, f"{name} (mean over tasks)")
        if mean:
            rows.append(mean)
    if lm.input_lengths:
        sent = [v[1] for v in lm.input_lengths.values()]
        for r in rows:
            r["input_tokens_mean"] = sum(sent) / len(sent)
    write_samples(getattr(handle, "run_dir", None), name, results, lm)
    return rows


def check(name: str, cfg, model) -> None:
    """lm-eval's own keys, before any model loads (what lm-eval itself checks, it checks later)."""
    keys.integer(name, cfg, "num_fewshot", 0, nullable=True)
    limit = cfg.get("limit")
    if limit is not None and not ((isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1)
                                  or (isinstance(limit, float) and 0 < limit < 1)):
        raise ConfigError(f"task.{name}.limit={limit}: allowed: null, an integer >= 1 (documents per task) "
                          f"or a fraction in (0, 1)")
    keys.integer(name, cfg, "batch_size")
    keys.integer(name, cfg, "max_gen_toks", nullable=True)
    keys.integer(name, cfg, "max_length", 1, keys.max_positions(model.arch), nullable=True)
    keys.choice(name, cfg, "scoring", ("prefill", "stock"))
    if "truncation" in cfg:
        keys.choice(name, cfg, "truncation", ("middle", "left"))
    if "max_input_tokens" in cfg:
        keys.integer(name, cfg, "max_input_tokens", nullable=True)
    seed = cfg.get("seed")

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    four = (isinstance(seed, (list, tuple)) or OmegaConf.is_list(seed)) and len(seed) == 4
    if not (whole(seed) or (four and all(v is None or whole(v) for v in seed))):
        raise ConfigError(f"task.{name}.seed={seed}: allowed: an integer >= 0 (all four of lm-eval's seeds) or "
                          f"four of them [random, numpy, torch, fewshot] (lm-eval's default: "
                          f"[{', '.join(map(str, LM_EVAL_SEEDS))}])")
    check_tasks_and_data(name, cfg)


def check_tasks_and_data(name: str, cfg) -> None:
    """The lm-eval names exist and their data is at hand, before any weights load: the local
    files under ``data_dir``, or offline (``HF_HUB_OFFLINE``), the datasets cache. Online, lm-eval
    downloads what is missing when it builds the tasks."""
    from qeval.data import corpus

    tmp = Path(tempfile.mkdtemp(prefix=f"qeval-check-{name}-"))
    try:
        _, leaves = load_tasks(name, cfg, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if cfg.get("data_dir") or not corpus.offline():
        return
    from datasets import load_dataset_builder
    for path, dataset_name in datasets_of(leaves):
        try:   # offline, this reads only the cache
            load_dataset_builder(path, dataset_name)
        except Exception as e:   # noqa: BLE001 - whatever datasets raises, the data is not at hand
            raise missing_data_error(name, leaves, e) from None


def task(name: str):
    """The task function for lm-eval task group ``name`` (``qeval/configs/task/<name>.yaml``)."""
    return lambda handle, cfg: evaluate_lm_eval(name, handle, cfg)


LM_EVAL_TASKS = ("gsm8k", "gsm8k_cot", "mmlu", "bbh", "longbench", "wikitext")
