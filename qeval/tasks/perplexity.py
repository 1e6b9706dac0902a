"""Token-level perplexity by the GPTQ protocol (IST-DASLab/gptq ``datautils.py``, ``llama.py``
``llama_eval``): ``task=wikitext2`` and ``task=c4``.

Windows come from :mod:`qeval.data.corpus` (WikiText-2: the test split joined with ``"\\n\\n"`` and
cut into ``numel // seqlen`` consecutive windows; C4: GPTQ's original seeded random windows by
default, its ``--new-eval`` windows with ``protocol=gptq_c4_new``). Each window is scored on its own from its
first token: position t predicts token t + 1, so a window of T tokens gives T - 1 predictions.
``llama_eval`` takes the mean loss of each window, multiplies it by ``seqlen``, sums, divides by
``nsamples * seqlen`` and exponentiates; every window has the same number of predictions, so that
is ``exp`` of the mean NLL over all predicted tokens, which is what is computed here (in float64
from fp32 log-probabilities; GPTQ's cross-entropy ran on fp16 logits). ``seqlen`` is capped at the
model's positions.

How a window is scored (``scoring``):

* ``one_pass``: one forward over the window, as GPTQ does. Under ``kv_semantics=simulated`` the
  attention quantizes K/V itself, so this already sees them quantized.
* ``through_cache``: as a server would produce the text: the first ``prefill_tokens`` tokens are
  prefilled into the method's own cache (the one generation uses, ``handle.new_cache``), then the
  rest is fed through it ``chunk`` tokens at a time. Every prediction after the prefill reads the
  stored (quantized, evicted) context; tokens of one chunk see each other at full precision, so
  ``chunk=1`` (pure decode) is the faithful reading and a larger chunk trades fidelity for speed.
  Under ``cache`` semantics one pass never reads a stored K/V, so a KIVI/GEAR/H2O cache would
  leave perplexity exactly at full precision.
* ``auto`` (default): ``through_cache`` when the run has a cache of its own (``cache`` semantics
  and a method that quantizes or evicts K/V), else ``one_pass``.

The embedded toy model (``model.path=@toy``) with ``corpus=auto`` and no ``data_dir`` scores the
held-out toy corpus instead (``dataset: toy_corpus``, ``protocol: toy_documents``), so the task
runs offline; the aggregation is the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qeval.data import corpus
from qeval.kv.cache import cache_kwarg
from qeval.tasks import keys

TASKS = ("wikitext2", "c4")   # configs/task/<name>.yaml; the protocol is the config's
TOY_MODEL_PATH = "@toy"
SCORINGS = ("auto", "one_pass", "through_cache")
CORPORA = ("auto", "dataset", "toy")


# ---------------------------------------------------------------------------- scoring
def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits, (B, L) next tokens -> (B, L) NLL in nats, from fp32 log-probabilities."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


@torch.no_grad()
def one_pass(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ids and mask -> (B, T - 1) NLL of tokens 1..T-1: one forward, no cache."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits   # (B, T, V)
    # one row at a time in fp32: (T, V) floats rather than (B, T, V)
    return torch.stack([token_nll(logits[b:b + 1, :-1], ids[b:b + 1, 1:])[0] for b in range(ids.shape[0])])


@torch.no_grad()
def through_cache(handle, ids: torch.Tensor, mask: torch.Tensor, prefill: int, chunk: int) -> torch.Tensor:
    """(B, T) -> (B, T - 1) NLL: tokens [0, prefill) prefilled into a fresh method cache, then
    [prefill, T - 1) fed through it ``chunk`` at a time (the last token predicts nothing).

    Rows are right-padded (documents of the toy corpus): a row's padding comes after all its real
    tokens, so no scored token ever attends to it, and the cache is given no padding mask (qeval's
    caches expect only left padding); the forward mask still hides it from attention."""
    model = handle.model
    B, T = ids.shape
    cache = handle.new_cache(None)
    kw = {cache_kwarg(model): cache}
    nll = torch.empty(B, T - 1, device=ids.device)
    first = min(prefill, T - 1)
    spans = [(0, first)] + [(s, min(s + chunk, T - 1)) for s in range(first, T - 1, chunk)]
    for s, e in spans:
        pos = torch.arange(s, e, device=ids.device).expand(B, -1)
        logits = model(input_ids=ids[:, s:e], attention_mask=mask[:, :e], position_ids=pos, use_cache=True,
                       **kw).logits
        nll[:, s:e] = token_nll(logits, ids[:, s + 1:e + 1])
    handle.stats.observe_cache(cache, handle.method)
    return nll


def aggregate(nll: torch.Tensor, lengths: torch.Tensor) -> tuple[float, int]:
    """(N, T - 1) NLL, (N,) real lengths -> (mean NLL over predicted tokens, their number)."""
    scored = torch.arange(nll.shape[1], device=nll.device)[None] < (lengths[:, None] - 1).to(nll.device)
    total = torch.where(scored, nll.double(), 0.0).sum()   # where, not *: a padded row's NaN stays out
    n = int(scored.sum())
    return float(total) / n, n


# ---------------------------------------------------------------------------- the task
def uses_toy_corpus(cfg) -> bool:
    if cfg.corpus == "auto":
        return cfg.get("model_path") == TOY_MODEL_PATH and not cfg.get("data_dir")
    return cfg.corpus == "toy"


def resolve_scoring(handle, scoring: str) -> str:
    if scoring != "auto":
        return scoring
    own_cache = handle.kv_semantics == "cache" and handle.method.needs_cache
    return "through_cache" if own_cache else "one_pass"


def effective_seqlen(seqlen: int, arch) -> int:
    longest = keys.max_positions(arch)
    return seqlen if longest is None else min(seqlen, longest)


def windows_for(name: str, handle, cfg, seqlen: int) -> corpus.Windows:
    if uses_toy_corpus(cfg):
        return corpus.document_windows(handle.tokenizer, corpus.toy_documents(cfg.toy_seed), seqlen, cfg.windows)
    texts = corpus.load_texts(name, cfg)
    return corpus.dataset_windows(cfg.protocol, handle.tokenizer, texts, seqlen, cfg.get("seed", 0),
                                  cfg.windows, corpus.dataset_label(cfg))


def evaluate_perplexity(name: str, handle, cfg) -> list[dict]:
    seqlen = effective_seqlen(cfg.seqlen, handle.model.config)
    w = windows_for(name, handle, cfg, seqlen)
    scoring = resolve_scoring(handle, cfg.scoring)
    # longest first, so a batch of toy documents pads little
    order = torch.argsort(w.lengths, descending=True, stable=True)
    nll = torch.empty(len(order), w.ids.shape[1] - 1)
    bar = handle.progress_bar(len(order), name)
    for i in range(0, len(order), cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        T = int(w.lengths[idx].max())
        ids = w.ids[idx, :T].to(handle.device)
        mask = (torch.arange(T)[None] < w.lengths[idx, None]).long().to(handle.device)
        if scoring == "one_pass":
            part = one_pass(handle.model, ids, mask)
        else:
            part = through_cache(handle, ids, mask, cfg.prefill_tokens, cfg.chunk)
        nll[idx, :T - 1] = part.float().cpu()
        nll[idx, T - 1:] = float("nan")
        handle.stats.prompt_tokens += int(mask.sum())
        bar.update(len(idx))
    bar.close()
    mean, n_tokens = aggregate(nll, w.lengths)
    common = {"n": len(order), "n_tokens": n_tokens, "protocol": w.protocol, "dataset": w.dataset,
              "seqlen": seqlen, "scoring": scoring,
              "prefill_tokens": cfg.prefill_tokens if scoring == "through_cache" else None,
              "chunk": cfg.chunk if scoring == "through_cache" else None}
    if w.dataset == corpus.TOY_CORPUS:
        common["split"] = f"held_out_seed_{cfg.toy_seed}"
    return [{"metric": "perplexity", "value": math.exp(mean)} | common,
            {"metric": "nll", "value": mean} | common]


def task(name: str):
    """The task function for ``qeval/configs/task/<name>.yaml``."""
    return lambda handle, cfg: evaluate_perplexity(name, handle, cfg)


def check(name: str, cfg, model) -> None:
    """Every key, and the dataset's availability when it can be known before any weights load
    (offline and not cached); ``model`` is a :class:`qeval.model.loading.ModelFacts`."""
    keys.choice(name, cfg, "protocol", corpus.PROTOCOLS)
    keys.choice(name, cfg, "corpus", CORPORA)
    keys.choice(name, cfg, "scoring", SCORINGS)
    keys.integer(name, cfg, "seqlen", 2)
    seqlen = effective_seqlen(cfg.seqlen, model.arch)
    keys.integer(name, cfg, "windows", 1, nullable=True)
    keys.integer(name, cfg, "batch_size")
    keys.integer(name, cfg, "prefill_tokens", 1, seqlen - 1)
    keys.integer(name, cfg, "chunk", 1, seqlen - 1)
    keys.integer(name, cfg, "toy_seed", 0)
    if "seed" in cfg:
        keys.integer(name, cfg, "seed", 0)
    if uses_toy_corpus(cfg):
        return
    if cfg.get("data_dir"):
        corpus.require_local(name, cfg)
    elif corpus.offline():
        corpus.load_texts(name, cfg)   # from the cache, or the one-line error now
