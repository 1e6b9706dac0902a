"""Calibration: ``calibration=auto`` resolves to each paper's setting (the toy corpus on the toy
model), a missing dataset is one line before any weights load, the samplings equal the authors'
loaders transcribed literally, and a saved result is reused by the next run of the same model and
method (identical rows) but not by a different one."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from hydra import compose, initialize_config_dir

from qeval.calibration import data, store
from qeval.data import corpus
from qeval.errors import ConfigError
from qeval.model.loading import char_tokenizer
from qeval.run import run
from qeval.sweep import expand
from qeval.validate import CONFIG_DIR, validate


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("overrides,want", [
    (["method=gptq"], ("gptq_c4", "allenai/c4", "random_windows", 128, 2048, 0)),
    (["method=smoothquant"], ("smoothquant_pile", "mit-han-lab/pile-val-backup", "documents", 512, 512, 42)),
    (["method=awq"], ("awq_pile", "mit-han-lab/pile-val-backup", "concatenated_blocks", 128, 512, 42)),
    (["method=gptq", "calibration.n_samples=16"], ("gptq_c4", "allenai/c4", "random_windows", 16, 2048, 0)),
    (["method=gptq", "calibration=smoothquant_pile"],
     ("smoothquant_pile", "mit-han-lab/pile-val-backup", "documents", 512, 512, 42)),
    (["method=gptq", "model=toy"], ("toy", "toy_corpus", "toy_documents", 128, 2048, 4321)),
])
def test_auto_is_the_methods_paper_setting_or_the_toy_corpus(overrides, want):
    spec = data.resolve(compose_cfg("model=tiny-random", *overrides))
    assert (spec.preset, spec.dataset, spec.sampling, spec.n_samples, spec.seq_len, spec.seed) == want


@pytest.mark.parametrize("override,message", [
    ("calibration.data_dir=/no/such/dir", ("calibration.data_dir=/no/such/dir: /no/such/dir/allenai/c4/"
     "en/c4-train.00000-of-01024/train.jsonl is missing (dataset allenai/c4/en/c4-train.00000-of-01024.json.gz")),
    ("calibration.dataset=qeval-tests/absent", ("calibration: dataset qeval-tests/absent/en/c4-train.00000-of-01024"
     ".json.gz (split train) could not be loaded")),   # offline (conftest) and not in the hub's cache
    ("calibration.n_samples=0", "calibration.n_samples=0: allowed: an integer >= 1"),
    ("calibration.seq_len=5000", "calibration.seq_len=5000: allowed: integers from 2 to 4096 (the model's positions)"),
])
def test_bad_or_missing_calibration_is_one_line_before_any_weights_load(override, message):
    cfg = compose_cfg("model=tiny-random", "method=gptq", "w_bits=4", override)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    if "could not be loaded" in message or "is missing" in message:   # advice that can be followed
        assert "calibration.data_dir=" in str(e.value) and "python -m qeval.prefetch calibration=gptq_c4" in str(e.value)


def test_methods_that_do_not_calibrate_never_look_for_data():
    validate(compose_cfg("model=tiny-random", "method=group", "w_bits=4", "calibration.data_dir=/no/such/dir"))
    validate(compose_cfg("model=tiny-random", "method=gptq", "w_bits=16", "calibration.data_dir=/no/such/dir"))


# ---------------------------------------------------------------------------- the authors' loaders
TEXTS = [" ".join(f"w{i}x{j}" for j in range(random.Random(i).randint(0, 60))) for i in range(40)]


def gptq_get_c4(traindata, tokenizer, nsamples, seed, seqlen):
    """IST-DASLab/gptq datautils.py get_c4's training loop, verbatim but for the dataset object."""
    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(traindata) - 1)
            trainenc = tokenizer(traindata[i]['text'], return_tensors='pt')
            if trainenc.input_ids.shape[1] >= seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        j = i + seqlen
        trainloader.append(trainenc.input_ids[:, i:j])
    return trainloader


def smoothquant_samples(dataset, tokenizer, num_samples, seq_len):
    """mit-han-lab/smoothquant calibration.py get_act_scales's inputs."""
    dataset = dataset.shuffle(seed=42)
    return [tokenizer(dataset[i]["text"], return_tensors="pt", max_length=seq_len, truncation=True).input_ids
            for i in range(num_samples)]


def awq_get_calib_dataset(dataset, tokenizer, n_samples, block_size):
    """mit-han-lab/llm-awq awq/utils/calib_data.py get_calib_dataset after load_dataset."""
    dataset = dataset.shuffle(seed=42)
    samples, n_run = [], 0
    for data_ in dataset:
        line_encoded = tokenizer.encode(data_["text"].strip())
        if len(line_encoded) > 512:
            continue
        sample = torch.tensor([line_encoded])
        if sample.numel() == 0:
            continue
        samples.append(sample)
        n_run += 1
        if n_run == n_samples:
            break
    cat_samples = torch.cat(samples, dim=1)
    n_split = cat_samples.shape[1] // block_size
    return [cat_samples[:, i * block_size:(i + 1) * block_size] for i in range(n_split)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_samplings_equal_the_authors_loaders():
    tok = char_tokenizer()
    ds = Dataset.from_dict({"text": TEXTS})
    column = ds["text"]     # what the hub gives: a lazy column, indexed like a list
    # seq_len 150 leaves some documents too short, so GPTQ's loop redraws
    assert same(data.random_windows(column, tok, 6, 150, 0), gptq_get_c4(ds, tok, 6, 0, 150))
    assert same(data.documents(column, tok, 8, 64, 42), smoothquant_samples(ds, tok, 8, 64))
    assert same(data.concatenated_blocks(TEXTS, tok, 10, 64, 42), awq_get_calib_dataset(ds, tok, 10, 64))


def test_a_local_copy_is_read_from_data_dir(tmp_path):
    spec = data.Spec("x", "org/set", None, "train", "documents", 3, 16, 42, str(tmp_path))
    path = tmp_path / "org/set/default/train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert data.texts(spec) == TEXTS
    assert same(data.load_samples(spec, char_tokenizer()), data.documents(TEXTS, char_tokenizer(), 3, 16, 42))


def test_toy_samples_are_whole_held_out_documents():
    tok = corpus.toy.build_tokenizer()
    got = data.toy_documents(tok, 30, 2048, 4321)
    assert len(got) == 30
    assert all(s[0, 0] == tok.bos_token_id and s[0, -1] == tok.eos_token_id for s in got)
    evaluation = data.toy_documents(tok, 30, 2048, corpus.TOY_SEED)
    assert not any(torch.equal(a, b) for a, b in zip(got, evaluation)), "calibration never sees evaluation text"


# ---------------------------------------------------------------------------- reuse
def rows_of(result) -> list[dict]:
    return [json.loads(line) for line in (Path(result["run_dir"]) / "rows.jsonl").read_text().splitlines()]


def test_a_second_run_reuses_the_saved_result_and_gives_identical_rows(tmp_path):
    common = ["model=toy", "device=cpu", "method=gptq", "w_bits=3", "calibration.n_samples=16",
              f"results_dir={tmp_path}"]
    first = rows_of(run(compose_cfg(*common, "task=quant_error")))
    second = rows_of(run(compose_cfg(*common, "task=[quant_error,toy_arith]", "task.toy_arith.n_samples=25")))
    assert {r["calibration_reused"] for r in first} == {False}
    assert {r["calibration_reused"] for r in second} == {True}
    assert first[0]["calibration.hash"] == second[0]["calibration.hash"]
    assert first[0]["calibration.tokens"] == second[0]["calibration.tokens"] > 0
    shared = [(r.get("layer"), r["metric"], r["value"]) for r in second if r["task"] == "quant_error"]
    assert shared == [(r.get("layer"), r["metric"], r["value"]) for r in first]
    saved = list((tmp_path / "calibration").iterdir())
    assert len(saved) == 1 and store.saved(saved[0]) and not list(saved[0].glob(".*.tmp"))
    # other bits are another result
    third = rows_of(run(compose_cfg(*common, "w_bits=4", "task=quant_error")))
    assert third[0]["calibration_reused"] is False and third[0]["calibration.hash"] != first[0]["calibration.hash"]


def test_a_result_without_its_meta_file_is_not_reused(tmp_path):
    (tmp_path / store.RESULT).write_bytes(b"half")
    assert not store.saved(tmp_path)


# ---------------------------------------------------------------------------- the study
SOTA = {("group", 3, 16), ("awq", 3, 16), ("group", 4, 16), ("awq", 4, 16), ("uniform", 8, 8),
        ("smoothquant", 8, 8), ("uniform", 4, 8), ("smoothquant", 4, 8), ("uniform", 16, 16)}


def study_cells(experiment, model):
    return [compose_cfg(*cell) for cell in expand([f"experiment={experiment}"]) if f"model={model}" in cell]


def test_the_sota_study_and_its_smoke_twin_sweep_the_same_grid():
    full, smoke = study_cells("qllm_eval_sota", "llama2-7b"), study_cells("qllm_eval_sota_smoke", "toy")
    for cells in (full, smoke):
        assert {(c.method.name, c.w_bits, c.a_bits) for c in cells} == SOTA and len(cells) == len(SOTA)
        assert all(c.w_group_size == 128 and c.method.get("zero_point", "integer") == "integer" for c in cells)
    assert {c.model.name for c in smoke} == {"toy"} and all(list(c.task) == ["passkey"] for c in smoke)
    for c in smoke:
        validate(c)   # offline: the toy model calibrates on its own corpus


# ---------------------------------------------------------------------------- prefetch
def gptq_get_wikitext2_train(traindata, tokenizer, nsamples, seed, seqlen):
    """IST-DASLab/gptq datautils.py get_wikitext2's training loop, verbatim but for the dataset object."""
    trainenc = tokenizer(" ".join(traindata['text']), return_tensors='pt')
    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        j = i + seqlen
        trainloader.append(trainenc.input_ids[:, i:j])
    return trainloader


def test_joined_windows_equal_gptqs_wikitext2_loader():
    tok, ds = char_tokenizer(), Dataset.from_dict({"text": TEXTS})
    assert same(data.joined_windows(ds["text"], tok, 7, 100, 0), gptq_get_wikitext2_train(ds, tok, 7, 0, 100))


def test_prefetch_writes_each_calibration_dataset_where_data_dir_reads_it(tmp_path, monkeypatch, capsys):
    """With the hub replaced by a local fake (no network in tests): each preset's split is fetched
    once, written where ``calibration.data_dir`` reads it, and validation then finds it."""
    from qeval import prefetch

    asked = []

    def fake_hub(node):
        asked.append((node.dataset_path, node.get("dataset_name"), node.get("data_files"), node.split))
        return Dataset.from_dict({"text": [f"{node.dataset_path} {node.split} {t}" for t in TEXTS],
                                  "meta": list(range(len(TEXTS)))})
    monkeypatch.setattr(corpus, "load_hub", fake_hub)
    cells = ["model=tiny-random", "method=awq,gptq", "w_bits=4", "--data-dir", str(tmp_path)]
    assert prefetch.main(cells) == 0
    assert prefetch.main(["calibration=gptq_wikitext2", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dataset mit-han-lab/pile-val-backup  [validation]" in out
    assert "dataset allenai/c4/en/c4-train.00000-of-01024.json.gz  [train]" in out
    assert sorted(asked) == [("Salesforce/wikitext", "wikitext-2-raw-v1", None, "train"),
                             ("allenai/c4", None, "en/c4-train.00000-of-01024.json.gz", "train"),
                             ("mit-han-lab/pile-val-backup", None, None, "validation")]
    for overrides in (["method=awq"], ["method=smoothquant", "a_bits=8"], ["method=gptq"],
                      ["method=gptq", "calibration=gptq_wikitext2"]):
        cfg = compose_cfg("model=tiny-random", "w_bits=4", f"calibration.data_dir={tmp_path}", *overrides,
                          f"results_dir={tmp_path / 'runs'}")
        validate(cfg)   # the one-line "missing dataset" error is gone
        spec = data.resolve(cfg)
        assert list(data.texts(spec)) == [f"{spec.dataset} {spec.split} {t}" for t in TEXTS]
