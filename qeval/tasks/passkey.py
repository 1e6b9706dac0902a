"""Passkey retrieval: find a random key hidden in filler text (Mohtashami & Jaggi, 2023).

The grid is lengths x depths, as in longctx_bench. Lengths are counted in the model's own tokens:
the filler is grown one sentence at a time until the prompt reaches the length, so the number
reported is what the model actually attends over. Deterministic for a seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from qeval.registry import register_task

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the pass key.\n")
FILLER = ["The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
          "There and back again. "]
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class Sample:
    prompt: str
    key: str
    length: int      # requested length in tokens
    depth: float
    n_tokens: int    # actual prompt length in tokens


def filler(start: int, n: int) -> str:
    """``n`` filler sentences, cycling from sentence ``start`` (short units give fine lengths)."""
    return "".join(FILLER[(start + i) % len(FILLER)] for i in range(n))


def make_prompt(key: str, n_filler: int, depth: float) -> str:
    before = round(n_filler * depth)
    return (INTRO + filler(0, before) + NEEDLE.format(key=key) + filler(before, n_filler - before)
            + QUESTION)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def build_samples(tokenizer, lengths, depths, samples_per_cell: int, key_digits: int, seed: int) -> list[Sample]:
    """The full grid, ``samples_per_cell`` keys per (length, depth) cell."""
    rng = random.Random(seed)
    lo, hi = 10 ** (key_digits - 1), 10**key_digits - 1
    # filler sentences per length, found once with a probe key of the right width
    probe = "9" * key_digits
    base = count_tokens(tokenizer, make_prompt(probe, 0, 0.0))
    per_filler = count_tokens(tokenizer, make_prompt(probe, 50, 0.0)) - base
    if min(lengths) < base:
        raise ValueError(f"task.passkey.lengths={min(lengths)}: shorter than the prompt without filler "
                         f"({base} tokens with this tokenizer); allowed: lengths >= {base}")
    samples = []
    for length in lengths:
        n_filler = max(0, (length - base) * 50 // max(1, per_filler) + 1)
        while n_filler > 0 and count_tokens(tokenizer, make_prompt(probe, n_filler, 0.0)) > length:
            n_filler -= 1
        for depth in depths:
            for _ in range(samples_per_cell):
                key = str(rng.randint(lo, hi))
                prompt = make_prompt(key, n_filler, depth)
                samples.append(Sample(prompt, key, length, depth, count_tokens(tokenizer, prompt)))
    return samples


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


@register_task("passkey")
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
