"""Text for the perplexity tasks: a real dataset's documents, or the toy model's own held-out corpus,
cut into the windows a protocol scores.

Datasets come from the Hugging Face hub (``datasets.load_dataset(dataset_path, dataset_name,
data_files=..., split=...)``, as GPTQ's ``datautils.py`` loads them) or, offline, from a local copy
laid out like the lm-eval tasks' (``python -m qeval.prefetch --data-dir`` writes it)::

    <data_dir>/<dataset_path>/<dataset_name, or the data file's path without .json.gz>/<split>.jsonl

one JSON object per line with a ``text`` field.

Windows, each a (N, T) tensor of token ids (IST-DASLab/gptq ``datautils.py``):

* ``gptq_wikitext2`` (``get_wikitext2``): every text joined with ``"\\n\\n"``, tokenized once
  (one BOS at the very start), cut into ``numel // seqlen`` consecutive windows; the tail dropped.
* ``gptq_c4_new`` (``get_c4_new``, GPTQ's ``--new-eval``): the first 1100 documents joined with
  ``" "``, tokenized once, the first ``256 * seqlen`` tokens cut into consecutive windows.
* ``gptq_c4`` (``get_c4``): ``random.seed(seed)``; 256 times: draw documents uniformly until one
  has at least ``seqlen`` tokens (each tokenized alone, so with its BOS), then a window of
  ``seqlen`` tokens from a uniform start in ``[0, len - seqlen - 1]``.
* ``toy_documents``: one window per held-out document of the toy model's training distribution,
  ``BOS + prompt + completion + EOS`` exactly as ``scripts/train_toy.py`` encodes them, truncated
  to ``seqlen`` and right-padded (``lengths`` says where each ends). The toy model never saw two
  documents in one sequence (a second one costs it about 18x the loss of the same text alone), so
  GPTQ's concatenation would measure that, not the model.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from qeval.data import toy
from qeval.errors import ConfigError

TOY_CORPUS = "toy_corpus"
# the held-out seed of the toy tasks (the toy model trains on seed 0)
TOY_SEED = 1234
# one round is the mix of one pretraining step of scripts/train_toy.py: a passkey document (length
# drawn from its MIN_LEN..MAX_LEN, 5-digit key, uniform depth) and 12 arithmetic + 12 multiple-choice
# examples; 8 rounds are 200 documents, about 14k tokens of the toy tokenizer
TOY_ROUNDS = 8
TOY_PASSKEY_LENGTHS = (96, 1088)
TOY_SHORT_PER_ROUND = 12
TOY_KEY_DIGITS = 5
C4_WINDOWS = 256          # GPTQ: 256 validation windows
C4_NEW_DOCUMENTS = 1100   # GPTQ get_c4_new: the first 1100 validation documents
PROTOCOLS = ("gptq_wikitext2", "gptq_c4_new", "gptq_c4")


@dataclass
class Windows:
    """``ids`` (N, T) token ids, right-padded; ``lengths`` (N,) real tokens per row (T for GPTQ)."""
    ids: torch.Tensor
    lengths: torch.Tensor
    protocol: str
    dataset: str


# ---------------------------------------------------------------------------- the toy corpus
@lru_cache(maxsize=4)
def toy_documents(seed: int = TOY_SEED, rounds: int = TOY_ROUNDS) -> tuple[str, ...]:
    """Held-out documents (prompt + completion) in the toy model's training mix, deterministic for
    ``seed``; passkey prompts are measured with the toy tokenizer, so the text is the same for
    every model."""
    rng = random.Random(seed)
    tokenizer = toy.build_tokenizer()
    docs = []
    for _ in range(rounds):
        length = rng.randint(*TOY_PASSKEY_LENGTHS)
        examples = toy.passkey_examples(tokenizer, length, [rng.random()], TOY_KEY_DIGITS, rng.randrange(2**31))
        short = [toy.arithmetic(rng) for _ in range(TOY_SHORT_PER_ROUND)]
        short += [toy.multiple_choice(rng) for _ in range(TOY_SHORT_PER_ROUND)]
        rng.shuffle(short)
        docs += [e.prompt + e.completion for e in examples + short]
    return tuple(docs)


def document_windows(tokenizer, docs, seqlen: int, limit: int | None) -> Windows:
    """One window per document: BOS + text + EOS (as the toy model was trained), cut at ``seqlen``."""
    rows = []
    for doc in docs[:limit]:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        rows.append((bos + ids + eos)[:seqlen])
    T = max(map(len, rows))
    out = torch.full((len(rows), T), tokenizer.pad_token_id or 0, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return Windows(out, torch.tensor([len(r) for r in rows]), "toy_documents", TOY_CORPUS)


# ---------------------------------------------------------------------------- GPTQ's windows
def consecutive(ids: torch.Tensor, seqlen: int, limit: int | None) -> torch.Tensor:
    """(1, L) -> (L // seqlen, seqlen): GPTQ's ``llama_eval`` slices, the tail dropped."""
    n = ids.shape[-1] // seqlen
    n = n if limit is None else min(n, limit)
    return ids[0, :n * seqlen].reshape(n, seqlen)


def gptq_windows(protocol: str, tokenizer, texts: list[str], seqlen: int, seed: int,
                 limit: int | None) -> torch.Tensor:
    if protocol == "gptq_wikitext2":
        return consecutive(tokenizer("\n\n".join(texts), return_tensors="pt").input_ids, seqlen, limit)
    if protocol == "gptq_c4_new":
        ids = tokenizer(" ".join(texts[:C4_NEW_DOCUMENTS]), return_tensors="pt").input_ids
        return consecutive(ids[:, :C4_WINDOWS * seqlen], seqlen, limit)
    rng = random.Random(seed)   # the same stream as GPTQ's random.seed(seed) on the global generator
    windows, draws = [], 0
    for _ in range(C4_WINDOWS if limit is None else min(C4_WINDOWS, limit)):
        while True:
            ids = tokenizer(texts[rng.randint(0, len(texts) - 1)], return_tensors="pt").input_ids
            if ids.shape[1] >= seqlen:
                break
            draws += 1   # GPTQ would draw forever from documents that are all too short
            if draws > 100 * len(texts):
                raise ConfigError(f"seqlen={seqlen}: no document drawn in {draws} tries has that many tokens")
        # GPTQ draws randint(0, len - seqlen - 1), which raises for a document of exactly seqlen
        # tokens; such a document (GPTQ would stop there) gives its only window, drawing nothing
        i = rng.randint(0, ids.shape[1] - seqlen - 1) if ids.shape[1] > seqlen else 0
        windows.append(ids[0, i:i + seqlen])
    return torch.stack(windows)


def dataset_windows(protocol: str, tokenizer, texts: list[str], seqlen: int, seed: int,
                    limit: int | None, dataset: str) -> Windows:
    ids = gptq_windows(protocol, tokenizer, texts, seqlen, seed, limit)
    return Windows(ids, torch.full((ids.shape[0],), seqlen), protocol, dataset)


# ---------------------------------------------------------------------------- datasets
def dataset_label(cfg) -> str:
    return "/".join(x for x in (cfg.dataset_path, cfg.get("dataset_name") or cfg.get("data_files")) if x)


def local_file(data_dir, cfg) -> Path:
    sub = cfg.get("dataset_name") or str(cfg.get("data_files") or "default").removesuffix(".gz").removesuffix(".json")
    return Path(data_dir).expanduser() / cfg.dataset_path / sub / f"{cfg.split}.jsonl"


def offline() -> bool:
    """Hub access is switched off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    from huggingface_hub import constants
    flag = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or flag


def missing_error(task: str, cfg, why: str) -> ConfigError:
    return ConfigError(f"task={task}: dataset {dataset_label(cfg)} (split {cfg.split}) could not be loaded ({why}); "
                       f"run `python -m qeval.prefetch task={task} task.{task}.corpus=dataset` where there is network, or set "
                       f"task.{task}.data_dir=<dir with {local_file('<dir>', cfg).relative_to('<dir>')}>")


def require_local(task: str, cfg) -> Path:
    path = local_file(cfg.data_dir, cfg)
    if not path.is_file():
        raise ConfigError(f"task.{task}.data_dir={cfg.data_dir}: {path} is missing (dataset "
                          f"{dataset_label(cfg)}, split {cfg.split}); write it with "
                          f"`python -m qeval.prefetch task={task} task.{task}.corpus=dataset --data-dir {cfg.data_dir}`")
    return path


def load_hub(cfg):
    import datasets

    files = {cfg.split: cfg.data_files} if cfg.get("data_files") else None
    return datasets.load_dataset(cfg.dataset_path, cfg.get("dataset_name"), data_files=files, split=cfg.split)


def load_texts(task: str, cfg) -> list[str]:
    """The split's ``text`` fields, from ``cfg.data_dir`` when set, else the hub (or its cache)."""
    if cfg.get("data_dir"):
        with require_local(task, cfg).open() as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    from datasets.exceptions import DatasetNotFoundError
    try:
        return list(load_hub(cfg)["text"])
    except (ConnectionError, FileNotFoundError, DatasetNotFoundError) as e:  # offline, not cached
        raise missing_error(task, cfg, type(e).__name__) from e


def write_local(cfg, data_dir: Path) -> Path:
    """Download the split (into the hub cache) and, with ``data_dir``, write it as JSON lines."""
    ds = load_hub(cfg)
    path = local_file(data_dir, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.select_columns(["text"]).to_json(str(path), lines=True, force_ascii=False)
    return path
