"""Passkey retrieval: find a random key hidden in filler text (Mohtashami & Jaggi, 2023).

The grid is lengths x depths, as in longctx_bench. Lengths are counted in the model's own tokens:
the filler is grown one sentence at a time until the prompt reaches the length, so the number
reported is what the model actually attends over. Deterministic for a seed.
"""

from __future__ import annotations

import re

from qeval.data.passkey import build_samples, shortest_prompt
from qeval.errors import ConfigError
from qeval.tasks import keys


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def check(name: str, cfg, model) -> None:
    """The grid fits the model: lengths within its positions (with room for the answer) and no
    shorter than the prompt without filler (this needs the tokenizer, not the weights), depths in
    [0, 1], at least one key per cell; before any weights load."""
    longest = keys.max_positions(model.arch)
    keys.integer(name, cfg, "key_digits", 1, 18)
    answer = cfg.key_digits + 3                       # tokens generated after each prompt
    keys.integers(name, cfg, "lengths", 1, None if longest is None else longest - answer)
    try:
        shortest = shortest_prompt(model.tokenizer, cfg.key_digits)
    except (OSError, ValueError) as e:   # a local model folder without a readable tokenizer
        raise ConfigError(f"model.path={model.model_cfg.get('path')}: no readable tokenizer "
                          f"({str(e).splitlines()[0][:200]})") from e
    if min(cfg.lengths) < shortest:
        raise ConfigError(f"task.{name}.lengths={min(cfg.lengths)}: shorter than the prompt without filler "
                          f"({shortest} tokens with this tokenizer); allowed: lengths >= {shortest}")
    keys.fractions(name, cfg, "depths")
    keys.integer(name, cfg, "samples_per_cell")
    keys.integer(name, cfg, "batch_size")
    keys.integer(name, cfg, "seed", 0)


def evaluate(handle, cfg) -> list[dict]:
    samples = build_samples(handle.tokenizer, cfg.lengths, cfg.depths, cfg.samples_per_cell,
                            cfg.key_digits, cfg.seed)
    hits: dict[tuple[int, float], list[bool]] = {}
    n_tokens: dict[int, list[int]] = {}
    bs = cfg.batch_size
    bar = handle.progress_bar(len(samples), "passkey")
    for i in range(0, len(samples), bs):
        batch = samples[i:i + bs]
        outputs = handle.generate([s.prompt for s in batch], max_new_tokens=cfg.key_digits + 3)
        for s, out in zip(batch, outputs):
            hits.setdefault((s.length, s.depth), []).append(first_number(out) == s.key)
            n_tokens.setdefault(s.length, []).append(s.n_tokens)
        bar.update(len(batch))
    bar.close()
    rows = []
    for (length, depth), h in hits.items():
        rows.append({"metric": "accuracy", "value": sum(h) / len(h), "n": len(h), "length": length,
                     "depth": depth, "prompt_tokens_mean": sum(n_tokens[length]) / len(n_tokens[length])})
    flat = [x for h in hits.values() for x in h]
    rows.append({"metric": "accuracy", "value": sum(flat) / len(flat), "n": len(flat)})
    return rows
