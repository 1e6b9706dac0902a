"""Passkey prompts: a random key hidden at a depth in filler text, measured in the model's own
tokens (Mohtashami & Jaggi, 2023). Shared by the passkey task, the toy model's training data and
the diagnostics' fixed text."""

from __future__ import annotations

import random
from dataclasses import dataclass

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


def shortest_prompt(tokenizer, key_digits: int) -> int:
    """Tokens of a prompt with no filler at all: the shortest length the task can build."""
    return count_tokens(tokenizer, make_prompt("9" * key_digits, 0, 0.0))


def build_samples(tokenizer, lengths, depths, samples_per_cell: int, key_digits: int, seed: int) -> list[Sample]:
    """The full grid, ``samples_per_cell`` keys per (length, depth) cell."""
    rng = random.Random(seed)
    lo, hi = 10 ** (key_digits - 1), 10**key_digits - 1
    # filler sentences per length, found once with a probe key of the right width
    probe = "9" * key_digits
    base = shortest_prompt(tokenizer, key_digits)
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
