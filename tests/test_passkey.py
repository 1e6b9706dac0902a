"""The passkey generator: real token lengths, the key at its depth, deterministic for a seed, and
scoring that is exact match."""

from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from qeval.data.passkey import INTRO, NEEDLE, QUESTION, build_samples
from qeval.model.handle import Stats
from qeval.model.loading import char_tokenizer
from qeval.tasks.passkey import evaluate, first_number

TOK = char_tokenizer()


def test_lengths_are_counted_in_the_tokenizers_tokens():
    samples = build_samples(TOK, [240, 300, 1000], [0.0, 0.5, 1.0], 2, 5, seed=0)
    assert len(samples) == 18
    for s in samples:
        assert s.n_tokens == len(TOK(s.prompt)["input_ids"])
        assert s.length - 25 <= s.n_tokens <= s.length, (s.length, s.n_tokens)


def test_a_length_shorter_than_the_scaffold_is_refused():
    with pytest.raises(ValueError, match="task.passkey.lengths=128: shorter than the prompt without filler"):
        build_samples(TOK, [128, 512], [0.5], 1, 5, seed=0)


def test_key_sits_at_its_depth_and_is_deterministic():
    a = build_samples(TOK, [512], [0.0, 0.5, 1.0], 3, 5, seed=7)
    b = build_samples(TOK, [512], [0.0, 0.5, 1.0], 3, 5, seed=7)
    c = build_samples(TOK, [512], [0.0, 0.5, 1.0], 3, 5, seed=8)
    assert a == b and a != c
    for s in a:
        assert len(s.key) == 5 and s.prompt.count(s.key) == 2
        # position of the needle within the filler region (between the intro and the question)
        body = len(s.prompt) - len(INTRO) - len(QUESTION) - len(NEEDLE.format(key=s.key))
        where = (s.prompt.index("The pass key is") - len(INTRO)) / body
        assert abs(where - s.depth) < 0.1, (where, s.depth)


class Oracle:
    """A handle that answers from the prompt: right for even-indexed prompts, wrong otherwise."""

    tokenizer = TOK
    stats = Stats()

    def __init__(self):
        self.i = 0

    def progress_bar(self, total, desc):
        return SimpleNamespace(update=lambda n: None, close=lambda: None)

    def generate(self, prompts, max_new_tokens):
        out = []
        for p in prompts:
            key = p.split("The pass key is ")[1][:5]
            out.append(f" {key}." if self.i % 2 == 0 else " 00000")
            self.i += 1
        return out


def test_scoring_is_exact_match_per_cell_and_overall():
    cfg = OmegaConf.create({"lengths": [250], "depths": [0.0, 1.0], "samples_per_cell": 2, "key_digits": 5,
                            "batch_size": 3, "seed": 0})
    rows = evaluate(Oracle(), cfg)
    overall = [r for r in rows if "length" not in r]
    assert overall == [{"metric": "accuracy", "value": 0.5, "n": 4}]
    cells = {(r["length"], r["depth"]): r["value"] for r in rows if "length" in r}
    assert cells == {(250, 0.0): 0.5, (250, 1.0): 0.5}
    assert first_number(" 12a34") == "12" and first_number("none") is None
