"""The lm-eval model class: at 16 bits it reproduces stock ``HFLM`` on an MMLU-format task (the
full group: 57 subjects, 4 subject groups) and on GSM8K; with a 2-bit ``cache``-semantics KV
method, prefill-then-continue scoring moves the log-likelihoods and stock one-pass scoring cannot."""

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval_fixtures import handle_for, task_cfg, write_gsm8k, write_mmlu

from qeval.tasks.lm_eval.model import QevalLM
from tolerances import network_rounding
from qeval.tasks.lm_eval.tasks import leaf_configs, load_tasks, rows_from_results

SEED = dict(random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def evaluate(lm, name, cfg, tmp_path):
    manager, leaves = load_tasks(name, cfg, tmp_path / f"yaml-{id(lm)}")
    out = simple_evaluate(model=lm, tasks=list(cfg.lm_eval_tasks), task_manager=manager,
                          num_fewshot=cfg.num_fewshot, limit=cfg.limit, log_samples=True,
                          gen_kwargs={"max_gen_toks": cfg.max_gen_toks} if cfg.max_gen_toks else None,
                          bootstrap_iters=0, **SEED)
    return out, leaves


def loglikelihoods(out) -> torch.Tensor:
    """Every (doc, choice) log-likelihood in a fixed order, from lm-eval's own sample log."""
    vals = []
    for task in sorted(out["samples"]):
        for s in sorted(out["samples"][task], key=lambda s: s["doc_id"]):
            vals += [float(r[0][0]) for r in s["resps"]]
    return torch.tensor(vals, dtype=torch.float64)


@pytest.fixture(scope="module")
def mmlu_data(tmp_path_factory):
    from pathlib import Path

    import lm_eval.tasks
    from lm_eval.tasks import TaskManager
    root = tmp_path_factory.mktemp("data")
    manager = TaskManager(include_defaults=False, include_path=str(Path(lm_eval.tasks.__file__).parent / "mmlu"))
    subjects = [c["dataset_name"] for c in leaf_configs(manager, ["mmlu"]).values()]
    assert len(subjects) == 57
    write_mmlu(root, subjects, n=1)
    return root


def test_16_bits_reproduces_stock_hflm_on_the_mmlu_group(mmlu_data, tmp_path):
    handle = handle_for("kv_bits=16")
    cfg = task_cfg("mmlu", data_dir=str(mmlu_data), limit=1, num_fewshot=0, batch_size=32)
    stock, leaves = evaluate(HFLM(pretrained=handle.model, tokenizer=handle.tokenizer, batch_size=32,
                                  device="cpu"), "mmlu", cfg, tmp_path)
    ours, _ = evaluate(QevalLM(handle, scoring="prefill", batch_size=32), "mmlu", cfg, tmp_path)
    a, b = loglikelihoods(stock), loglikelihoods(ours)
    assert len(a) == 57 * 4
    assert torch.allclose(a, b, atol=1e-4, rtol=0), f"max diff {(a - b).abs().max():.2e}"
    rows_stock = {(r["subtask"], r["metric"]): r["value"] for r in rows_from_results(stock, "stock", leaves)}
    rows_ours = {(r["subtask"], r["metric"]): r["value"] for r in rows_from_results(ours, "prefill", leaves)}
    assert rows_ours == rows_stock
    # the subject groups and the total are there, under lm-eval's names
    for group in ("mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other"):
        assert (group, "acc,none") in rows_ours


def test_16_bits_reproduces_stock_hflm_on_gsm8k(tmp_path):
    write_gsm8k(tmp_path / "data", n=2)
    handle = handle_for("kv_bits=16")
    cfg = task_cfg("gsm8k", data_dir=str(tmp_path / "data"), limit=2, num_fewshot=2, max_gen_toks=12,
                   batch_size=2)
    stock, leaves = evaluate(HFLM(pretrained=handle.model, tokenizer=handle.tokenizer, batch_size=2,
                                  device="cpu"), "gsm8k", cfg, tmp_path)
    ours, _ = evaluate(QevalLM(handle, batch_size=2), "gsm8k", cfg, tmp_path)
    gen = lambda out: [s["resps"] for s in sorted(out["samples"]["gsm8k"], key=lambda s: s["doc_id"])]
    assert gen(ours) == gen(stock)
    assert rows_from_results(ours, "x", leaves) == rows_from_results(stock, "x", leaves)


def test_2_bit_kivi_moves_mmlu_only_under_prefill_scoring(mmlu_data, tmp_path):
    # R = G = 32 so the few-shot context (hundreds of characters) is mostly quantized
    method = ("method=kivi", "method.group_size=32", "method.residual_length=32")
    cfg = task_cfg("mmlu", data_dir=str(mmlu_data), lm_eval_tasks=["mmlu_anatomy", "mmlu_virology"],
                   limit=1, num_fewshot=2, batch_size=8)
    score = {}
    for bits in (16, 2):
        handle = handle_for(*method, f"kv_bits={bits}", "kv_semantics=cache")
        for scoring in ("prefill", "stock"):
            out, _ = evaluate(QevalLM(handle, scoring=scoring, batch_size=8), "mmlu", cfg, tmp_path)
            score[bits, scoring] = loglikelihoods(out)
    # stock one-pass scoring never reads the stored K/V: bit-identical to 16 bits
    assert torch.equal(score[2, "stock"], score[16, "stock"])
    # prefill + continuation reads the quantized context for every scored token
    moved = (score[2, "prefill"] - score[16, "prefill"]).abs()
    assert moved.min() > 1e-3, f"smallest change {moved.min():.2e}"
    assert torch.allclose(score[16, "prefill"], score[16, "stock"], atol=1e-4, rtol=0)


def mc_requests(tokenizer, n_questions: int = 3) -> list:
    """MMLU-shaped requests: a few-shot context of ~200 tokens, four single-token choices each."""
    reqs = []
    for q in range(n_questions):
        ctx = tokenizer.encode(f"Question {q}: which number follows {q + 10}? " * 8 + "Answer:")
        for choice in (" A", " B", " C", " D"):
            reqs.append((("ctx", choice), ctx, tokenizer.encode(choice, add_special_tokens=False)))
    return reqs


@pytest.mark.parametrize("method", [("kv_bits=16",), ("method=kivi", "kv_bits=2", "method.group_size=32",
                                                      "method.residual_length=32"),
                                    ("method=uniform", "kv_bits=2"), ("method=gear", "kv_bits=2"), ("method=h2o",)])
def test_a_shared_context_is_prefilled_once_and_scores_as_if_alone(method):
    handle = handle_for(*method, "kv_semantics=cache")
    lm = QevalLM(handle, batch_size=8)
    reqs = mc_requests(handle.tokenizer)
    assert [len(g) for g in lm._by_prefix(reqs)] == [4, 4, 4], "each question's choices share one prefix"
    grouped = torch.tensor([ll for ll, _ in lm._loglikelihood_tokens(reqs)], dtype=torch.float64)
    tokens_grouped = handle.stats.prompt_tokens
    handle.stats.__init__()
    alone = torch.tensor([lm._score_batch([r])[0][0] for r in reqs], dtype=torch.float64)
    # the expanded rows hold exactly the prefill's stored K/V: what differs is only the batch
    # shape of the matmuls, whose fp32 summation order may change; a log-probability is a logit
    # minus a log-sum-exp, each within the network's fp32 rounding bound (tests/tolerances.py)
    bound = 2 * network_rounding(handle.model.config, alone.abs().max().item())
    assert (grouped - alone).abs().max() <= bound, f"max diff {(grouped - alone).abs().max():.2e} > {bound:.2e}"
    # and each context went through the model once, not four times
    assert tokens_grouped < 0.5 * handle.stats.prompt_tokens
