"""Tiny datasets in the real schemas of lm-eval's tasks, made up here (no real rows), laid out
as ``task.<name>.data_dir`` expects: ``<dir>/<dataset_path>/<dataset_name>/<split>.jsonl``."""

from __future__ import annotations

import json
import random
from pathlib import Path

from omegaconf import OmegaConf


def _write(root: Path, dataset: str, name: str, split: str, rows: list[dict]) -> None:
    folder = root / dataset / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def arithmetic_problem(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    return (f"Tom has {a} marbles and finds {b} more. How many marbles does Tom have?",
            f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} marbles.\n#### {a + b}")


def write_gsm8k(root: Path, n: int = 3, seed: int = 0, train: int = 6) -> None:
    """openai/gsm8k, config main: {question, answer}; the answer ends in '#### <number>'."""
    rng = random.Random(seed)
    for split, k in (("train", train), ("test", n)):
        _write(root, "openai/gsm8k", "main", split,
               [dict(zip(("question", "answer"), arithmetic_problem(rng))) for _ in range(k)])


def mmlu_rows(subject: str, k: int, rng: random.Random) -> list[dict]:
    """cais/mmlu: {question, subject, choices (4 strings), answer (index 0-3)}."""
    rows = []
    for _ in range(k):
        a = rng.randint(10, 99)
        choices = [str(a + d) for d in rng.sample(range(-5, 6), 4)]
        rows.append({"question": f"Which number follows {a - 1} in a count about {subject.replace('_', ' ')}?"
                                 f" Consider the sequence carefully before answering.",
                     "subject": subject, "choices": choices,
                     "answer": choices.index(str(a)) if str(a) in choices else 0})
    return rows


def write_mmlu(root: Path, subjects, n: int = 3, seed: int = 0) -> None:
    rng = random.Random(seed)
    for s in subjects:
        _write(root, "cais/mmlu", s, "dev", mmlu_rows(s, 5, rng))
        _write(root, "cais/mmlu", s, "test", mmlu_rows(s, n, rng))


def write_bbh(root: Path, subtasks, n: int = 2, seed: int = 0) -> None:
    """SaylorTwift/bbh: {input, target}, test split only (the 3 shots are inline in lm-eval)."""
    rng = random.Random(seed)
    for t in subtasks:
        rows = [{"input": f"not ( {rng.choice(['True', 'False'])} and True ) is", "target": rng.choice(["True", "False"])}
                for _ in range(n)]
        _write(root, "SaylorTwift/bbh", t, "test", rows)


def write_longbench(root: Path, subsets, n: int = 2, context_chars: int = 900, seed: int = 0) -> None:
    """Xnhyacinth/LongBench: {question, context, answers, length, dataset, language, all_classes, _id},
    each answer in its subset's own form, as LongBench's metrics parse it: ``Paragraph N`` (``段落N``)
    for passage retrieval, a count for passage_count, one of ``all_classes`` for classification."""
    rng = random.Random(seed)
    words = ["river", "stone", "lantern", "meadow", "harbor", "violet", "copper", "summit"]
    classes = ["river", "stone"]
    for sub in subsets:
        rows = []
        for i in range(n):
            ctx = " ".join(rng.choice(words) for _ in range(context_chars // 6))
            answer = ctx.split()[0]
            if sub.startswith("passage_retrieval"):
                label = "段落" if sub.endswith("_zh") else "Paragraph "
                paragraphs = [ctx[j::3] for j in range(3)]
                ctx = "\n\n".join(f"{label}{j + 1}: {p}" for j, p in enumerate(paragraphs))
                answer = f"{label}{rng.randrange(3) + 1}"
            elif sub == "passage_count":
                answer = str(rng.randrange(1, 4))
            elif sub in ("trec", "lsht"):
                answer = rng.choice(classes)
            rows.append({"question": f"Which word comes first in passage {i}?", "context": ctx,
                         "answers": [answer], "length": len(ctx.split()), "dataset": sub,
                         "language": "zh" if sub.endswith("_zh") or sub in ("lsht", "dureader") else "en",
                         "all_classes": classes if sub in ("trec", "lsht") else None, "_id": f"{sub}-{i}"})
        _write(root, "Xnhyacinth/LongBench", sub, "test", rows)


def task_cfg(name: str, **overrides):
    """The task's shipped config with overrides, as the runner hands it to the task."""
    base = OmegaConf.load(Path(__file__).resolve().parent.parent / "qeval" / "configs" / "task" / f"{name}.yaml")
    return OmegaConf.merge(base, overrides)


def handle_for(*overrides: str):
    """A handle exactly as ``python -m qeval <overrides>`` builds it (composed, validated, quantized)."""
    from hydra import compose, initialize_config_dir

    from qeval.run import prepare, validate

    config_dir = str(Path(__file__).resolve().parent.parent / "qeval" / "configs")
    with initialize_config_dir(config_dir=config_dir, version_base="1.3", job_name="test"):
        cfg = compose("config", overrides=["model=tiny-random", "device=cpu", *overrides])
    validate(cfg)
    return prepare(cfg)[0]
