"""The lm-eval tasks end to end and offline: the command line on local GSM8K (+ MMLU in the same
model load), lm-eval's own GSM8K answer extraction on our tiny data, BBH's and LongBench's full
task lists, LongBench's middle truncation and chat-template convention, one-line data errors."""

import json
import subprocess
import sys
from pathlib import Path

import lm_eval.tasks
import pytest
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval_fixtures import handle_for, task_cfg, write_bbh, write_gsm8k, write_longbench, write_mmlu

from qeval.errors import ConfigError
from qeval.tasks.lm_eval.tasks import evaluate_lm_eval, leaf_configs, load_tasks, sent_prompt

TASKS_DIR = Path(lm_eval.tasks.__file__).parent


def test_command_line_gsm8k_and_mmlu_in_one_load_offline(tmp_path):
    data = tmp_path / "data"
    write_gsm8k(data, n=2)
    write_mmlu(data, ["anatomy"], n=2)
    p = subprocess.run([sys.executable, "-m", "qeval", "model=tiny-random", "task=[gsm8k,mmlu]",
                        f"task.gsm8k.data_dir={data}", "task.gsm8k.limit=2", "task.gsm8k.max_gen_toks=8",
                        "task.gsm8k.num_fewshot=2", f"task.mmlu.data_dir={data}", "task.mmlu.num_fewshot=1",
                        "task.mmlu.lm_eval_tasks=[mmlu_anatomy]", f"results_dir={tmp_path / 'results'}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir, = (tmp_path / "results" / "runs").iterdir()
    rows = [json.loads(l) for l in (run_dir / "rows.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in rows)
    by = {(r["task"], r["metric"]): r for r in rows}
    for metric in ("exact_match,strict-match", "exact_match,flexible-extract"):
        r = by["gsm8k", metric]
        assert r["n"] == 2 and r["task_version"] == 3.0 and r["scoring"] == "prefill" and r["stderr"] is not None
        assert r["num_fewshot"] == 2 and r["kv_bits"] == 16 and r["input_tokens_mean"] > 100
    r = by["mmlu", "acc,none"]
    assert r["subtask"] == "mmlu_anatomy" and r["n"] == 2 and r["task_version"] == 1.0
    samples = [json.loads(l) for l in (run_dir / "samples.jsonl").read_text().splitlines()]
    # lm-eval logs a sample once per filter (gsm8k: strict-match, flexible-extract)
    assert sorted({(s["qeval_task"], s["doc_id"], s["filter"]) for s in samples}) == [
        ("gsm8k", 0, "flexible-extract"), ("gsm8k", 0, "strict-match"), ("gsm8k", 1, "flexible-extract"),
        ("gsm8k", 1, "strict-match"), ("mmlu", 0, "none"), ("mmlu", 1, "none")]
    assert all("resps" in s and "doc" in s for s in samples)


class Oracle(LM):
    """Answers every GSM8K question with its own reference solution (from our tiny data)."""

    def __init__(self, answers: dict[str, str]):
        super().__init__()
        self.answers = answers

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for r in requests:
            question = next(q for q in self.answers if r.args[0].rstrip().endswith(q + "\nAnswer:")
                            or r.args[0].rstrip().endswith(q + "\nA:"))
            out.append(self.answers[question])
        return out

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


@pytest.mark.parametrize("name", ["gsm8k", "gsm8k_cot"])
def test_gsm8k_data_is_read_by_lm_evals_own_answer_extraction(tmp_path, name):
    write_gsm8k(tmp_path / "data", n=3)
    docs = [json.loads(l) for l in (tmp_path / "data/openai/gsm8k/main/test.jsonl").read_text().splitlines()]
    gold = {d["question"]: d["answer"] for d in docs}
    if name == "gsm8k_cot":  # the CoT exemplars end in "The answer is N."
        gold = {q: a.split("####")[0].strip() + f" The answer is {a.split('#### ')[-1]}." for q, a in gold.items()}
    cfg = task_cfg(name, data_dir=str(tmp_path / "data"))
    manager, _ = load_tasks(name, cfg, tmp_path / "yaml")
    out = simple_evaluate(model=Oracle(gold), tasks=[name], task_manager=manager, num_fewshot=cfg.num_fewshot,
                          bootstrap_iters=0)
    res = out["results"][name]
    strict = "exact_match,strict-match"
    assert res[strict] == 1.0 and res["exact_match,flexible-extract"] == 1.0
    # and a wrong number is caught
    wrong = {q: a.replace(a.split()[-1], "99999.") if name == "gsm8k_cot" else a.rsplit("#### ", 1)[0] + "#### 99999"
             for q, a in gold.items()}
    out = simple_evaluate(model=Oracle(wrong), tasks=[name], task_manager=manager, num_fewshot=cfg.num_fewshot,
                          bootstrap_iters=0)
    assert out["results"][name][strict] == 0.0


def test_full_task_lists_come_from_lm_eval():
    leaves = lambda d, n: leaf_configs(TaskManager(include_defaults=False, include_path=str(TASKS_DIR / d)), [n])
    bbh = leaves("bbh", "bbh_cot_fewshot")
    assert len(bbh) == 27 and all(c["num_fewshot"] == 3 and len(c["fewshot_config"]["samples"]) == 3
                                  for c in bbh.values())
    longbench = leaves("longbench", "longbench")
    assert len(longbench) == 21 and all(n.startswith("longbench_") and not n.endswith("_e") for n in longbench)
    assert len(leaves("mmlu", "mmlu")) == 57


def test_bbh_cot_end_to_end(tmp_path):
    subtasks = ["boolean_expressions"]  # the shortest exemplars: 3-shot CoT is ~2k characters
    write_bbh(tmp_path / "data", subtasks)
    cfg = task_cfg("bbh", data_dir=str(tmp_path / "data"), max_gen_toks=6, batch_size=2,
                   lm_eval_tasks=[f"bbh_cot_fewshot_{t}" for t in subtasks])
    rows = evaluate_lm_eval("bbh", handle_for("method=kivi", "kv_bits=4"), cfg)
    got = {(r["subtask"], r["metric"]): r for r in rows}
    for t in subtasks:
        r = got[f"bbh_cot_fewshot_{t}", "exact_match,get-answer"]
        assert r["n"] == 2 and r["num_fewshot"] == 3 and r["task_version"] == 4.0


def test_longbench_middle_truncation_chat_convention_and_average(tmp_path):
    # passage_retrieval_en: its metric reads "Paragraph N" out of the answer (the fixture writes it so)
    subsets = ["hotpotqa", "trec", "passage_count", "lcc", "passage_retrieval_en"]
    write_longbench(tmp_path / "data", subsets, n=2, context_chars=900)
    handle = handle_for("kv_bits=16")
    handle.run_dir = tmp_path / "run"
    handle.tokenizer.chat_template = "{% for m in messages %}[U]{{ m['content'] }}[/U]{% endfor %}[A]"
    budget = 300
    cfg = task_cfg("longbench", data_dir=str(tmp_path / "data"), max_gen_toks=4, max_input_tokens=budget, batch_size=4,
                   lm_eval_tasks=[f"longbench_{s}" for s in subsets])
    rows = evaluate_lm_eval("longbench", handle, cfg)
    scores = {r["subtask"]: r["value"] for r in rows if r["metric"] == "score,none"}
    leaf = [scores[f"longbench_{s}"] for s in subsets]
    assert scores["longbench (mean over tasks)"] == pytest.approx(sum(leaf) / len(leaf))
    samples = [json.loads(l) for l in (handle.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * len(subsets)
    for s in samples:
        sent = sent_prompt(s["arguments"])
        assert s["input_tokens"] > budget >= s["input_tokens_truncated"] > budget - 10
        chat = not s["lm_eval_task"].endswith(("_trec", "_lcc"))  # LongBench never chats on these
        assert sent.startswith("[U]") == chat
        body = sent.removeprefix("[U]").removesuffix("[/U][A]")
        doc_prompt = s["doc"]["context"]
        assert doc_prompt[:40] not in body[len(body) // 2:]  # the middle went, both ends stayed
        assert body.rstrip().endswith(("Answer:", "is:", "code:", s["doc"]["question"]))


def test_missing_data_is_one_line_naming_dataset_and_override(tmp_path):
    handle = handle_for("kv_bits=16")
    with pytest.raises(ConfigError) as e:
        evaluate_lm_eval("gsm8k", handle, task_cfg("gsm8k", data_dir=str(tmp_path)))
    msg = str(e.value)
    assert "\n" not in msg and "openai/gsm8k" in msg and "task.gsm8k.data_dir" in msg
    with pytest.raises(ConfigError) as e:  # the hub, offline (conftest), nothing cached
        evaluate_lm_eval("gsm8k_cot", handle, task_cfg("gsm8k_cot"))
    msg = str(e.value)
    assert "\n" not in msg and "openai/gsm8k/main" in msg and "task.gsm8k_cot.data_dir" in msg


def test_prefetch_lists_every_model_and_dataset_of_a_sweep(capsys):
    from qeval import prefetch

    assert prefetch.main(["model=tiny-random,llama2-7b", "task=[gsm8k,mmlu,passkey]", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l for l in lines if l.startswith("model")] == ["model   meta-llama/Llama-2-7b-hf"]
    assert "dataset openai/gsm8k/main  [test, train]" in lines
    mmlu = [l for l in lines if l.startswith("dataset cais/mmlu/")]
    assert len(mmlu) == 57 and all(l.endswith("[dev, test]") for l in mmlu)
