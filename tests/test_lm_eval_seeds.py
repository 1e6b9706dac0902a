"""qeval's few-shot prompts are stock lm-eval's: the four seeds default to lm-eval's own
(0 / 1234 / 1234 / 1234), so GSM8K, whose shots are sampled at random from the train split, shows
the model exactly the prompts ``lm_eval.simple_evaluate`` with its defaults would."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval_fixtures import handle_for, task_cfg, write_gsm8k
from transformers import LlamaConfig

from qeval.errors import ConfigError
from qeval.model.loading import ModelFacts
from qeval.tasks.lm_eval.tasks import (
    LM_EVAL_SEEDS,
    check,
    evaluate_lm_eval,
    load_tasks,
    seeds,
    sent_prompt,
)

LIMIT, SHOTS = 4, 3


class Recorder(LM):
    """Stands in for a model: records every prompt lm-eval builds and answers nothing useful (the
    prompts do not depend on the answers)."""

    def __init__(self):
        super().__init__()
        self.prompts: list[str] = []

    def generate_until(self, requests, disable_tqdm=False):
        self.prompts += [r.args[0] for r in requests]
        return ["#### 0"] * len(requests)

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


def stock_prompts(cfg, **seed_kwargs) -> dict[int, str]:
    """doc_id -> prompt of lm-eval's own ``simple_evaluate`` (its defaults unless seeds are given)."""
    with tempfile.TemporaryDirectory() as tmp:
        manager, _ = load_tasks("gsm8k", cfg, Path(tmp))   # the local data, nothing else
        results = simple_evaluate(model=Recorder(), tasks=["gsm8k"], task_manager=manager,
                                  num_fewshot=SHOTS, limit=LIMIT, log_samples=True, bootstrap_iters=0,
                                  **seed_kwargs)
    return {s["doc_id"]: sent_prompt(s["arguments"]) for s in results["samples"]["gsm8k"]}


def qeval_prompts(run_dir: Path) -> dict[int, str]:
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return {s["doc_id"]: sent_prompt(s["arguments"]) for s in samples}


@pytest.mark.timeout(300)
def test_gsm8k_few_shot_prompts_equal_stock_lm_evals_with_its_default_seeds(tmp_path):
    # 12 train rows for 3 random shots: two seeds drawing the same shots in the same order for
    # every one of 4 documents is (1/1320)^4-unlikely, so equal prompts mean equal seeds
    write_gsm8k(tmp_path / "data", n=LIMIT, train=12)
    cfg = task_cfg("gsm8k", data_dir=str(tmp_path / "data"), limit=LIMIT, num_fewshot=SHOTS, max_gen_toks=2,
                   bootstrap_iters=0)
    assert seeds(cfg.seed) == dict(zip(("random_seed", "numpy_random_seed", "torch_random_seed",
                                        "fewshot_random_seed"), LM_EVAL_SEEDS))
    handle = handle_for()
    handle.run_dir = tmp_path / "run"
    evaluate_lm_eval("gsm8k", handle, cfg)
    ours = qeval_prompts(handle.run_dir)
    assert len(ours) == LIMIT and all(p.count("Question:") == SHOTS + 1 for p in ours.values())
    assert ours == stock_prompts(cfg)
    # and the seeds matter: seed 0 everywhere (what qeval passed before) samples other shots
    assert ours != stock_prompts(cfg, **seeds(0))


@pytest.mark.parametrize("seed", [-1, "abc", [0, 1], [0, 1, 2, -3], True])
def test_a_bad_seed_is_one_line_naming_lm_evals_form(seed):
    cfg = task_cfg("gsm8k", seed=seed)
    with pytest.raises(ConfigError, match=r"task.gsm8k.seed=.*: allowed: an integer >= 0 .* \[0, 1234, 1234, 1234\]"):
        check("gsm8k", cfg, ModelFacts(LlamaConfig(), None))


def test_one_integer_sets_all_four_and_null_leaves_a_generator_alone():
    assert set(seeds(7).values()) == {7}
    assert seeds([1, None, 2, 3])["numpy_random_seed"] is None
