"""Calibration data: which samples a calibrated method sees, resolved from ``calibration=`` and the
method's own preset, checked and loaded before any weights.

``calibration=auto`` (the default) resolves to the preset the method's YAML names in its
``calibration`` key (``qeval/configs/calibration/<preset>.yaml``: the paper's own setting), or to ``toy``
on the embedded toy model without a ``data_dir``; any key set in the ``calibration`` node replaces
the preset's. A sample is a (1, T) tensor of token ids, run through the model alone (no padding).

Samplings, each written after the authors' loader:

* ``random_windows``: IST-DASLab/gptq ``datautils.py`` ``get_c4``: ``random.seed(seed)``; per
  sample, documents drawn uniformly until one has at least ``seq_len`` tokens (tokenized alone, with
  its BOS), then a window from ``randint(0, len - seq_len - 1)``. A document of exactly ``seq_len``
  tokens (where GPTQ's ``randint`` raises) gives its only window without a draw, as
  :func:`qeval.data.corpus.gptq_windows` does.
* ``documents``: mit-han-lab/smoothquant ``calibration.py`` ``get_act_scales``: the dataset
  shuffled with ``seed`` (``datasets``' ``shuffle``: ``numpy.random.default_rng(seed).permutation``),
  the first ``n_samples`` documents, each truncated to ``seq_len`` tokens.
* ``concatenated_blocks``: mit-han-lab/llm-awq ``awq/utils/calib_data.py`` ``get_calib_dataset``:
  shuffled the same way; the first ``n_samples`` documents that, stripped and tokenized, are
  non-empty and at most 512 tokens (a constant there, whatever the block size), concatenated and
  cut into ``len // seq_len`` blocks.
* ``joined_windows``: IST-DASLab/gptq ``datautils.py`` ``get_wikitext2``: the split's texts joined
  with ``" "`` and tokenized once; ``random.seed(seed)``, then per sample a window from
  ``randint(0, len - seq_len - 1)``.
* ``toy_documents``: held-out documents of the toy model's training mix
  (:func:`qeval.data.corpus.toy_documents`), ``BOS + text + EOS`` as it was trained, cut at ``seq_len``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf

from qeval import CONFIG_DIR
from qeval.data import corpus
from qeval.errors import ConfigError

AUTO = "auto"
TOY = "toy"
TOY_MODEL_PATH = "@toy"
SAMPLINGS = ("random_windows", "documents", "concatenated_blocks", "joined_windows", "toy_documents")
KEYS = ("dataset", "data_files", "split", "sampling", "n_samples", "seq_len", "seed", "data_dir", "dataset_name")
# llm-awq calib_data.py: ``if len(line_encoded) > 512: continue``, independent of block_size
AWQ_MAX_DOCUMENT_TOKENS = 512
# toy_documents: one passkey document and 2 x 12 short ones per round
TOY_DOCUMENTS_PER_ROUND = 1 + 2 * corpus.TOY_SHORT_PER_ROUND


@dataclass(frozen=True)
class Spec:
    """A resolved calibration: the preset it came from and every key of it."""

    preset: str
    dataset: str
    data_files: str | None
    split: str | None
    sampling: str
    n_samples: int
    seq_len: int
    seed: int
    data_dir: str | None = None
    dataset_name: str | None = None    # the hub dataset's configuration (wikitext-2-raw-v1)

    def identity(self) -> dict:
        """What the samples are: every key but the preset's name and where a local copy lives (and
        no configuration name where there is none, so results saved before the key existed still match)."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("preset", "data_dir") and not (k == "dataset_name" and v is None)}

    def row(self) -> dict:
        return {f"calibration.{k}": v for k, v in asdict(self).items()}

    @property
    def label(self) -> str:
        return "/".join(str(x) for x in (self.dataset, self.dataset_name, self.data_files) if x)

    def prefetch_command(self, data_dir: str | None = None) -> str:
        """The ``python -m qeval.prefetch`` line that fetches exactly this data: the preset, plus
        every source key that differs from it (a dataset given on the command line)."""
        preset = yaml.safe_load((CONFIG_DIR / "calibration" / f"{self.preset}.yaml").read_text())
        keys = [f"calibration.{k}={getattr(self, k)}" for k in ("dataset", "dataset_name", "data_files", "split")
                if getattr(self, k) != preset.get(k)]
        where = [f"--data-dir {data_dir}"] if data_dir else []
        return " ".join(["python -m qeval.prefetch", f"calibration={self.preset}", *keys, *where])


def presets() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "calibration").glob("*.yaml") if p.stem != AUTO)


def uses_toy(cfg) -> bool:
    return cfg.model.get("path") == TOY_MODEL_PATH and not cfg.calibration.get("data_dir")


def resolve(cfg) -> Spec:
    """The calibration a run uses: ``cfg.calibration`` itself, or for ``auto`` the method's (or the
    toy model's) preset with the node's non-null keys on top."""
    node = OmegaConf.to_container(cfg.calibration, resolve=True)
    if node["name"] == AUTO:
        name = TOY if uses_toy(cfg) else cfg.method.get("calibration")
        if name not in presets():
            raise ConfigError(f"method.calibration={name}: method {cfg.method.name} names no calibration "
                              f"preset; allowed: {', '.join(presets())}")
        given = {k: v for k, v in node.items() if k != "name" and v is not None}
        node = yaml.safe_load((CONFIG_DIR / "calibration" / f"{name}.yaml").read_text()) | given
    return Spec(node["name"], **{k: node.get(k) for k in KEYS})


def _integer(key: str, value, low: int, high: int | None = None, why: str = "") -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high)
    if not ok:
        allowed = f"integers from {low} to {high}{why}" if high is not None else f"an integer >= {low}"
        raise ConfigError(f"calibration.{key}={value}: allowed: {allowed}")


def check(spec: Spec, positions: int | None) -> None:
    """The keys of a resolved calibration (``positions``: the model's longest sequence)."""
    if spec.sampling not in SAMPLINGS:
        raise ConfigError(f"calibration.sampling={spec.sampling}: allowed: {', '.join(SAMPLINGS)}")
    _integer("n_samples", spec.n_samples, 1)
    _integer("seq_len", spec.seq_len, 2, positions, " (the model's positions)")
    _integer("seed", spec.seed, 0)


def check_available(spec: Spec) -> None:
    """The dataset can be read: a local copy under ``data_dir``, or, offline, the hub's cache (the
    one-line error now, before any weights load). Online, the hub is asked when the data is loaded."""
    if spec.sampling == "toy_documents":
        return
    if spec.data_dir:
        _local_path(spec)
    elif corpus.offline():
        texts(spec)


def source(spec: Spec):
    """The node :mod:`qeval.data.corpus`'s loaders (and ``python -m qeval.prefetch``) read."""
    return OmegaConf.create({"dataset_path": spec.dataset, "dataset_name": spec.dataset_name,
                             "data_files": spec.data_files, "split": spec.split or "train"})


def _local_path(spec: Spec) -> Path:
    path = corpus.local_file(spec.data_dir, source(spec))
    if not path.is_file():
        raise ConfigError(f"calibration.data_dir={spec.data_dir}: {path} is missing (dataset {spec.label}, "
                          f"split {spec.split}); write it with `{spec.prefetch_command(spec.data_dir)}` "
                          f"(or as JSON lines with a text field)")
    return path


def texts(spec: Spec) -> Sequence[str]:
    """The split's ``text`` fields: the local copy when ``data_dir`` is set, else the hub (or its cache),
    as a lazy column (a C4 shard is not held as Python strings; the samplings index it)."""
    if spec.data_dir:
        with _local_path(spec).open() as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    from datasets.exceptions import DatasetNotFoundError
    try:
        return corpus.load_hub(source(spec))["text"]
    except (ConnectionError, FileNotFoundError, DatasetNotFoundError) as e:   # offline and not cached
        local = corpus.local_file("<dir>", source(spec)).relative_to("<dir>")
        raise ConfigError(f"calibration: dataset {spec.label} (split {spec.split}) could not be loaded "
                          f"({type(e).__name__}); run `{spec.prefetch_command()}` "
                          f"(with --data-dir <dir>) where there is network, then set calibration.data_dir=<dir with "
                          f"{local}> or use its Hugging Face cache") from e


# ---------------------------------------------------------------------------- samplings
def random_windows(texts: Sequence[str], tokenizer, n: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """GPTQ ``get_c4``'s training windows (see the module docstring)."""
    rng = random.Random(seed)   # the stream of GPTQ's random.seed(seed) on the global generator
    out = []
    for _ in range(n):
        for _draw in range(100 * len(texts)):
            ids = tokenizer(texts[rng.randint(0, len(texts) - 1)], return_tensors="pt").input_ids
            if ids.shape[1] >= seq_len:
                break
        else:   # GPTQ would draw forever
            raise ConfigError(f"calibration.seq_len={seq_len}: no document drawn in {100 * len(texts)} tries "
                              f"has that many tokens")
        i = rng.randint(0, ids.shape[1] - seq_len - 1) if ids.shape[1] > seq_len else 0
        out.append(ids[:, i:i + seq_len])
    return out


def documents(texts: Sequence[str], tokenizer, n: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """SmoothQuant ``get_act_scales``'s samples: shuffled documents, each truncated; a document that
    tokenizes to nothing (no BOS, empty text) is skipped, as it could not be run."""
    order = np.random.default_rng(seed).permutation(len(texts))
    out = [tokenizer(texts[int(i)], return_tensors="pt", max_length=seq_len, truncation=True).input_ids
           for i in order[:n]]
    return [ids for ids in out if ids.shape[1] > 0]


def concatenated_blocks(texts: Sequence[str], tokenizer, n: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """AWQ ``get_calib_dataset``'s blocks (see the module docstring)."""
    kept = []
    for i in np.random.default_rng(seed).permutation(len(texts)):
        ids = tokenizer.encode(texts[int(i)].strip())
        if 0 < len(ids) <= AWQ_MAX_DOCUMENT_TOKENS:
            kept.append(torch.tensor([ids]))
            if len(kept) == n:
                break
    cat = torch.cat(kept, dim=1)
    if cat.shape[1] < seq_len:
        raise ConfigError(f"calibration.seq_len={seq_len}: the {len(kept)} documents hold {cat.shape[1]} tokens, "
                          f"less than one block; allowed: seq_len <= {cat.shape[1]} or more n_samples")
    return [cat[:, j * seq_len:(j + 1) * seq_len] for j in range(cat.shape[1] // seq_len)]


def joined_windows(texts: Sequence[str], tokenizer, n: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """GPTQ ``get_wikitext2``'s training windows (see the module docstring)."""
    ids = tokenizer(" ".join(texts), return_tensors="pt").input_ids
    if ids.shape[1] <= seq_len:    # GPTQ's randint would raise
        raise ConfigError(f"calibration.seq_len={seq_len}: the joined split holds {ids.shape[1]} tokens; "
                          f"allowed: seq_len < {ids.shape[1]}")
    rng = random.Random(seed)   # the stream of GPTQ's random.seed(seed) on the global generator
    out = []
    for _ in range(n):
        i = rng.randint(0, ids.shape[1] - seq_len - 1)
        out.append(ids[:, i:i + seq_len])
    return out


def toy_documents(tokenizer, n: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    docs = corpus.toy_documents(seed, -(-n // TOY_DOCUMENTS_PER_ROUND))
    w = corpus.document_windows(tokenizer, docs, seq_len, n)
    # right-padded windows -> one unpadded (1, T) sample per document
    return [w.ids[i:i + 1, :int(w.lengths[i])] for i in range(w.ids.shape[0])]


def load_samples(spec: Spec, tokenizer) -> list[torch.Tensor]:
    if spec.sampling == "toy_documents":
        return toy_documents(tokenizer, spec.n_samples, spec.seq_len, spec.seed)
    sample = {"random_windows": random_windows, "documents": documents,
              "concatenated_blocks": concatenated_blocks, "joined_windows": joined_windows}[spec.sampling]
    return sample(texts(spec), tokenizer, spec.n_samples, spec.seq_len, spec.seed)
