"""Perplexity: GPTQ's windows and aggregation reproduced (WikiText-2, both C4 variants), the toy
model's offline corpus, reading through the method's cache (equal to one pass at 16 bits and for a
KIVI residual that holds the whole window, moved by 2-bit KIVI), every key checked before any
weights load, lm-eval's ``wikitext`` equal to stock ``HFLM``, and the report's direction.

Tolerances: the mean NLL of two fp32 evaluations of the same network (one pass against decode
through a cache, a padded batch against one row) differs by at most twice the largest logit
difference (``nll = logsumexp(z) - z_y``, each term moves by at most ``max |dz|``), bounded by
:func:`tolerances.network_rounding`, plus the rounding of the log-softmax's own sum over the
vocabulary (:func:`tolerances.sum_rounding`)."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lm_eval_fixtures import handle_for, task_cfg
from omegaconf import OmegaConf
from tolerances import network_rounding, sum_rounding

from qeval.data import corpus
from qeval.errors import ConfigError
from qeval.model.loading import char_tokenizer
from qeval.run import run
from qeval.tasks import perplexity
from qeval.validate import CONFIG_DIR, validate

TOK = char_tokenizer()
WORDS = ["the", "river", "stone", "lantern", "meadow", "harbor", "violet", "copper", "summit", "of", "a",
         "and", "in", "to", "was", "is"]
KIVI_2 = ("method=kivi", "kv_bits=2", "method.group_size=32")


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) + " ." for _ in range(n)]


def nll_bound(model, ids: torch.Tensor) -> float:
    """How far two fp32 evaluations' mean NLL on these windows may differ (module docstring)."""
    with torch.no_grad():
        magnitude = model(input_ids=ids).logits.abs().max().item()
    return 2 * network_rounding(model.config, magnitude) + sum_rounding(model.config.vocab_size, 1.0)


@pytest.fixture(scope="module")
def wikitext_dir(tmp_path_factory) -> Path:
    """A local copy in WikiText's schema (``text`` per line, empty lines too), as prefetch writes it."""
    root = tmp_path_factory.mktemp("data")
    lines = [x for s in sentences(60) for x in ("", s)]
    folder = root / "Salesforce/wikitext/wikitext-2-raw-v1"
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return root


def wiki_cfg(data_dir, **kw):
    return task_cfg("wikitext2", model_path=None, data_dir=str(data_dir), seqlen=128, windows=3, batch_size=3, **kw)


def wiki_windows(data_dir) -> torch.Tensor:
    """The (3, 128) windows ``wiki_cfg`` scores, tokenized here as GPTQ does."""
    path = data_dir / "Salesforce/wikitext/wikitext-2-raw-v1/test.jsonl"
    texts = [json.loads(line)["text"] for line in path.open()]
    return TOK("\n\n".join(texts), return_tensors="pt").input_ids[:, :3 * 128].reshape(3, 128)


def value(rows, metric: str = "nll") -> float:
    return next(r["value"] for r in rows if r["metric"] == metric)


# ---------------------------------------------------------------------------- GPTQ's windows
def test_wikitext2_windows_are_consecutive_slices_of_the_joined_text_tail_dropped():
    texts = sentences(40)
    ids = TOK("\n\n".join(texts), return_tensors="pt").input_ids[0]
    w = corpus.gptq_windows("gptq_wikitext2", TOK, texts, 100, 0, None)
    assert w.shape == (len(ids) // 100, 100)
    assert torch.equal(w.flatten(), ids[:w.numel()])
    assert torch.equal(corpus.gptq_windows("gptq_wikitext2", TOK, texts, 100, 0, 2), w[:2])


def test_c4_random_windows_replay_gptqs_get_c4():
    seqlen = 80
    # GPTQ's code raises on a document of exactly seqlen tokens (randint(0, -1)); leave those out here
    texts = [t for t in sentences(200, seed=1) if len(TOK(t).input_ids) != seqlen]
    # IST-DASLab/gptq datautils.get_c4, its validation half, on the global generator as written there
    random.seed(0)
    want = []
    for _ in range(256):
        while True:
            i = random.randint(0, len(texts) - 1)
            tmp = TOK(texts[i], return_tensors="pt").input_ids
            if tmp.shape[1] >= seqlen:
                break
        i = random.randint(0, tmp.shape[1] - seqlen - 1)
        want.append(tmp[:, i:i + seqlen])
    want = torch.hstack(want).reshape(256, seqlen)   # llama_eval's slices of the hstack
    assert torch.equal(corpus.gptq_windows("gptq_c4", TOK, texts, seqlen, 0, None), want)
    assert torch.equal(corpus.gptq_windows("gptq_c4", TOK, texts, seqlen, 0, 5), want[:5])
    # where GPTQ would stop, such a document gives its one window
    exact = "x" * seqlen
    assert corpus.gptq_windows("gptq_c4", TOK, [exact], seqlen, 0, 2).tolist() == [TOK(exact).input_ids] * 2


def test_c4_new_windows_are_the_first_1100_documents_joined_with_a_space():
    texts = sentences(1300, seed=2)
    want = TOK(" ".join(texts[:1100]), return_tensors="pt").input_ids[:, :256 * 16]
    w = corpus.gptq_windows("gptq_c4_new", TOK, texts, 16, 0, None)
    assert w.shape == (256, 16) and torch.equal(w.flatten(), want[0])


def test_toy_corpus_is_held_out_and_encoded_as_the_toy_model_was_trained():
    from qeval.data import toy

    docs = corpus.toy_documents()
    assert docs == corpus.toy_documents(1234) and docs != corpus.toy_documents(0)
    assert len(docs) == corpus.TOY_ROUNDS * (1 + 2 * corpus.TOY_SHORT_PER_ROUND)
    tok = toy.build_tokenizer()
    w = corpus.document_windows(tok, docs, 2048, 3)
    ex = toy.arithmetic(random.Random(5))
    # scripts/train_toy.py encode(): BOS + prompt, the completion, EOS
    trained = tok(ex.prompt)["input_ids"] + tok(ex.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert corpus.document_windows(tok, [ex.prompt + ex.completion], 2048, None).ids[0].tolist() == trained
    assert w.ids.shape[0] == 3 and w.lengths.max() == w.ids.shape[1]


# ---------------------------------------------------------------------------- scoring
def test_one_pass_reproduces_gptqs_llama_eval(wikitext_dir):
    handle = handle_for("kv_bits=16")
    rows = perplexity.evaluate_perplexity("wikitext2", handle, wiki_cfg(wikitext_dir))
    enc = wiki_windows(wikitext_dir).reshape(1, -1)
    nlls = []
    for i in range(3):   # llama.py llama_eval, seqlen 128, on the first 3 windows
        batch = enc[:, i * 128:(i + 1) * 128]
        with torch.no_grad():
            logits = handle.model(batch).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        nlls.append(loss.float() * 128)
    ppl = torch.exp(torch.stack(nlls).sum() / (3 * 128)).item()
    got = value(rows, "perplexity")
    assert abs(math.log(got) - math.log(ppl)) <= nll_bound(handle.model, enc.reshape(3, 128)), (got, ppl)
    r = rows[0]
    assert (r["n"], r["n_tokens"], r["seqlen"], r["protocol"], r["scoring"]) == (3, 3 * 127, 128, "gptq_wikitext2", "one_pass")
    assert r["dataset"] == "Salesforce/wikitext/wikitext-2-raw-v1" and r["chunk"] is None


def test_through_cache_equals_one_pass_at_16_bits_and_with_a_residual_holding_the_window(wikitext_dir):
    fp = handle_for("kv_bits=16")
    one = value(perplexity.evaluate_perplexity("wikitext2", fp, wiki_cfg(wikitext_dir, scoring="one_pass")))
    bound = nll_bound(fp.model, wiki_windows(wikitext_dir))
    for handle, kw in [(fp, {"scoring": "through_cache"}),
                       (fp, {"scoring": "through_cache", "chunk": 8, "prefill_tokens": 32}),
                       # residual 128 >= the 127 tokens fed: KIVI never flushes, the cache stays exact
                       (handle_for(*KIVI_2, "method.residual_length=128"), {})]:
        rows = perplexity.evaluate_perplexity("wikitext2", handle, wiki_cfg(wikitext_dir, **kw))
        assert rows[0]["scoring"] == "through_cache"
        assert abs(value(rows) - one) <= bound, (kw, value(rows) - one, bound)


def test_2_bit_kivi_moves_perplexity_only_through_the_cache(wikitext_dir):
    fp = handle_for("kv_bits=16")
    one = value(perplexity.evaluate_perplexity("wikitext2", fp, wiki_cfg(wikitext_dir)))
    bound = nll_bound(fp.model, wiki_windows(wikitext_dir))
    kivi = handle_for(*KIVI_2, "method.residual_length=32")
    rows = perplexity.evaluate_perplexity("wikitext2", kivi, wiki_cfg(wikitext_dir))
    assert (rows[0]["scoring"], rows[0]["chunk"], rows[0]["prefill_tokens"]) == ("through_cache", 1, 1)
    assert abs(value(rows) - one) > 10 * bound, (value(rows) - one, bound)
    assert kivi.stats.kv_bytes_held > 0
    # one pass never reads a cache-semantics cache: exactly full precision
    stock = perplexity.evaluate_perplexity("wikitext2", kivi, wiki_cfg(wikitext_dir, scoring="one_pass"))
    assert value(stock) == one


def test_simulated_kv_is_scored_in_one_pass_and_moves_it(wikitext_dir):
    handle = handle_for("kv_bits=16")
    fp = value(perplexity.evaluate_perplexity("wikitext2", handle, wiki_cfg(wikitext_dir)))
    rows = perplexity.evaluate_perplexity("wikitext2", handle_for("kv_bits=2", "kv_semantics=simulated"),
                                          wiki_cfg(wikitext_dir))
    # (a random model may do better or worse: only that it moved is asserted)
    assert rows[0]["scoring"] == "one_pass"
    assert abs(value(rows) - fp) > 10 * nll_bound(handle.model, wiki_windows(wikitext_dir))


@pytest.mark.parametrize("kv, scoring", [(("kv_bits=16",), "one_pass"),
                                         ((*KIVI_2, "method.residual_length=32"), "through_cache")])
def test_a_padded_batch_of_documents_scores_as_each_document_alone(kv, scoring):
    handle = handle_for(*kv)
    # through the cache, chunks of 3 after a prefill of 4: spans that cross the shorter documents' ends
    cfg = task_cfg("wikitext2", model_path=None, corpus="toy", seqlen=160, windows=5, scoring=scoring,
                   chunk=3, prefill_tokens=4)
    batched = perplexity.evaluate_perplexity("wikitext2", handle, OmegaConf.merge(cfg, {"batch_size": 5}))
    alone = perplexity.evaluate_perplexity("wikitext2", handle, OmegaConf.merge(cfg, {"batch_size": 1}))
    w = corpus.document_windows(TOK, corpus.toy_documents(), 160, 5)
    assert w.lengths.min() < 160 == w.lengths.max()                 # there is padding to get wrong
    assert (batched[0]["dataset"], batched[0]["scoring"]) == ("toy_corpus", scoring)
    assert batched[0]["n_tokens"] == int((w.lengths - 1).sum())
    assert abs(value(batched) - value(alone)) <= nll_bound(handle.model, w.ids[:1])


# ---------------------------------------------------------------------------- the toy model, offline
def toy_run(tmp_path, *overrides):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=toy", "task=wikitext2", "device=cpu", f"results_dir={tmp_path}",
                                           "task.wikitext2.windows=8", "task.wikitext2.seqlen=128", *overrides])
    return run(cfg)["rows"]


@pytest.fixture(scope="module")
def toy_fp(tmp_path_factory):
    """``python -m qeval model=toy task=wikitext2`` (8 documents, 128 tokens), offline: its rows."""
    return toy_run(tmp_path_factory.mktemp("results"))


def test_toy_wikitext2_runs_offline_and_equals_a_direct_computation(toy_fp):
    from qeval.model import loading

    r = next(r for r in toy_fp if r["metric"] == "perplexity")
    assert (r["dataset"], r["protocol"], r["scoring"], r["status"]) == ("toy_corpus", "toy_documents", "one_pass", "ok")
    model, tok = loading.load(OmegaConf.create({"path": "@toy"}), "cpu")
    total, count, magnitude = 0.0, 0, 0.0
    for doc in corpus.toy_documents()[:8]:
        ids = torch.tensor([(tok(doc)["input_ids"] + [tok.eos_token_id])[:128]])
        with torch.no_grad():
            logits = model(ids).logits[0]
        total += F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
        magnitude = max(magnitude, logits.abs().max().item())
    bound = 2 * network_rounding(model.config, magnitude) + sum_rounding(model.config.vocab_size, 1.0)
    assert r["n_tokens"] == count
    assert abs(math.log(r["value"]) - total / count) <= bound, (r["value"], math.exp(total / count))


def test_toy_kivi_2_bit_reads_through_the_cache_and_moves_it(toy_fp, tmp_path):
    fp = next(r["value"] for r in toy_fp if r["metric"] == "nll")
    rows = toy_run(tmp_path, *KIVI_2, "method.residual_length=32")
    r = next(r for r in rows if r["metric"] == "nll")
    assert r["scoring"] == "through_cache" and r["kv_bytes_held"] > 0 and r["value"] != fp
    stock = toy_run(tmp_path, *KIVI_2, "method.residual_length=32", "task.wikitext2.scoring=one_pass")
    assert next(r["value"] for r in stock if r["metric"] == "nll") == fp


# ---------------------------------------------------------------------------- keys, before any weights
def validated(*overrides):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        validate(compose("config", overrides=["device=cpu", *overrides]))


@pytest.mark.parametrize("override, message", [
    ("task.wikitext2.seqlen=1", "task.wikitext2.seqlen=1: allowed: an integer >= 2"),
    ("task.wikitext2.windows=0", "task.wikitext2.windows=0: allowed: an integer >= 1 or null"),
    ("task.wikitext2.batch_size=0", "task.wikitext2.batch_size=0: allowed: an integer >= 1"),
    ("task.wikitext2.chunk=0", "task.wikitext2.chunk=0: allowed: an integer from 1 to 2047"),
    # the toy model has 2048 positions: seqlen=4096 is capped there
    ("task.wikitext2.seqlen=4096 task.wikitext2.prefill_tokens=3000",
     "task.wikitext2.prefill_tokens=3000: allowed: an integer from 1 to 2047"),
    ("task.wikitext2.scoring=stock", "task.wikitext2.scoring=stock: allowed: auto, one_pass, through_cache"),
    ("task.wikitext2.corpus=wiki", "task.wikitext2.corpus=wiki: allowed: auto, dataset, toy"),
    ("task.c4.protocol=gptq", "task.c4.protocol=gptq: allowed: gptq_wikitext2, gptq_c4_new, gptq_c4"),
    ("task.c4.seed=-1", "task.c4.seed=-1: allowed: an integer >= 0"),
])
def test_every_key_is_checked_before_any_weights_load(override, message):
    task = override.split(".")[1]
    with pytest.raises(ConfigError) as e:
        validated("model=toy", f"task={task}", *override.split())
    assert str(e.value) == message


@pytest.mark.parametrize("task, where", [("wikitext2", "Salesforce/wikitext/wikitext-2-raw-v1/test.jsonl"),
                                         ("c4", "allenai/c4/en/c4-validation.00000-of-00008/validation.jsonl")])
def test_a_missing_dataset_is_one_line_naming_it_and_the_override(task, where, tmp_path):
    with pytest.raises(ConfigError) as e:       # offline (conftest) and not cached
        validated("model=tiny-random", f"task={task}")
    label = "Salesforce/wikitext/wikitext-2-raw-v1 (split test)" if task == "wikitext2" else \
        "allenai/c4/en/c4-validation.00000-of-00008.json.gz (split validation)"
    assert str(e.value) == (f"task={task}: dataset {label} could not be loaded (ConnectionError); run "
                            f"`python -m qeval.prefetch task={task} task.{task}.corpus=dataset` where there is network, or set "
                            f"task.{task}.data_dir=<dir with {where}>")
    with pytest.raises(ConfigError, match=rf"^task.{task}.data_dir={tmp_path}: {tmp_path / where} is missing"):
        validated("model=tiny-random", f"task={task}", f"task.{task}.data_dir={tmp_path}")
    validated("model=toy", f"task={task}")      # the toy model needs no dataset


# ---------------------------------------------------------------------------- lm-eval's wikitext
def test_lm_eval_wikitext_at_16_bits_equals_stock_hflm(tmp_path):
    """qeval's ``task=wikitext`` (the adapter's inherited ``loglikelihood_rolling``: lm-eval's rolling
    windows, each scored by the adapter) against stock ``HFLM`` on a tiny local copy."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from qeval.tasks.lm_eval import tasks

    folder = tmp_path / "data/EleutherAI/wikitext_document_level/wikitext-2-raw-v1"
    folder.mkdir(parents=True)
    pages = [" = Heading = \n " + " ".join(sentences(k, seed=k)) + " \n" for k in (3, 9, 14)]
    for split in ("train", "test"):   # lm-eval reads the train split (its few-shot source) even at 0 shots
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"page": p}) + "\n" for p in pages))
    cfg = task_cfg("wikitext", data_dir=str(tmp_path / "data"), max_length=64, batch_size=4, bootstrap_iters=0)
    handle = handle_for("kv_bits=16")
    # max_length 64: the longer pages take several rolling windows
    stock = HFLM(pretrained=handle.model, tokenizer=handle.tokenizer, batch_size=4, max_length=64, device="cpu")
    manager, leaves = tasks.load_tasks("wikitext", cfg, tmp_path / "yaml")
    res = simple_evaluate(model=stock, tasks=["wikitext"], task_manager=manager, bootstrap_iters=0,
                          random_seed=0, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    out = {"stock": {r["metric"]: r["value"] for r in tasks.rows_from_results(res, "stock", leaves)},
           "ours": {r["metric"]: r["value"] for r in tasks.evaluate_lm_eval("wikitext", handle, cfg)}}
    assert set(out["ours"]) == {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"}
    # every token's NLL within the rounding bound, summed over the pages' tokens and divided by the
    # metric's unit (lm-eval counts words and bytes of the page before detokenization)
    tokens = sum(len(TOK(p).input_ids) for p in pages)
    worst = tokens * nll_bound(handle.model, TOK(pages[2], return_tensors="pt").input_ids[:, :64])
    words, nbytes = sum(len(re.split(r"\s+", p)) for p in pages), sum(len(p.encode()) for p in pages)
    log = {m: math.log(v) for m, v in out["stock"].items() if "perplexity" in m}
    assert abs(math.log(out["ours"]["word_perplexity,none"]) - log["word_perplexity,none"]) <= worst / words
    assert abs(math.log(out["ours"]["byte_perplexity,none"]) - log["byte_perplexity,none"]) <= worst / nbytes
    assert abs(out["ours"]["bits_per_byte,none"] - out["stock"]["bits_per_byte,none"]) <= worst / nbytes / math.log(2)


def test_prefetch_lists_the_perplexity_datasets_but_not_the_toy_corpus(capsys):
    from qeval import prefetch

    assert prefetch.main(["model=tiny-random", "task=[wikitext2,c4,wikitext]", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "dataset Salesforce/wikitext/wikitext-2-raw-v1  [test]" in lines
    assert "dataset allenai/c4/en/c4-validation.00000-of-00008.json.gz  [validation]" in lines
    assert "dataset EleutherAI/wikitext_document_level/wikitext-2-raw-v1  [test, train, validation]" in lines
    assert prefetch.main(["model=toy", "task=[wikitext2,c4]", "--dry-run"]) == 0
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------- the report
def test_report_headlines_perplexity_and_says_lower_is_better(tmp_path):
    from test_report_cells import write

    from qeval.report.figures import build_figures
    from qeval.report.gather import gather, headline
    from qeval.report.tables import write_tables

    for kv, ppl in ((16, 5.5), (2, 6.1)):
        write(tmp_path, ppl, task="wikitext2", metric="perplexity", kv_bits=kv, method="kivi",
              details=[{"metric": "nll", "value": math.log(ppl)}])
    df = gather(tmp_path)
    assert set(headline(df)["metric"]) == {"perplexity"}
    write_tables(df, tmp_path / "tables")
    md = (tmp_path / "tables" / "wikitext2.md").read_text()
    assert "### wikitext2 (perplexity), lower is better; in brackets: difference to fp32" in md
    assert "6.1 (+0.6)" in md
    fig = next(f for name, f, _ in build_figures(df) if name == "bits_wikitext2")
    assert "lower is better" in fig.get_suptitle() and "lower is better" in fig.axes[0].get_ylabel()
