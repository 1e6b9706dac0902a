"""Synthetic data in the formats of qeval's tasks: what the embedded toy model learns and is scored on.

Three generators, shared by ``scripts/train_toy.py`` (training, one seed) and the toy tasks
(held-out evaluation, another seed), so the model sees exactly the prompt format it is scored in:

* passkey: prompts come from :mod:`qeval.data.passkey` (``build_samples``, the passkey task's own
  builder); the answer is `` <key>.`` after "The pass key is".
* arithmetic: one- and two-step grade-school word problems, GSM8K's ``Question: ..\\nAnswer:``
  prompt, answers that show the working and end in ``#### <number>``.
* multiple choice: four-option questions about a closed vocabulary of categories, in MMLU's prompt
  form (header, question, ``A. .. D.``, ``Answer:``) answered by one letter.

Numbers stay small and the facts few so that a model of about a million parameters can learn
them; the item space is still far larger than any training run, so a held-out seed tests
generalisation, not recall. The word-level tokenizer for the toy model is built here too, from the
closed vocabulary of these generators.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from qeval.data import passkey

NAMES = ["Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Ella", "Max", "Zoe", "Jack", "Lily"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells"]

# (template, operation); {n}/{m} names, {i} items, {a} {b} {c} numbers
ARITH_TEMPLATES = {
    "add": "{n} has {a} {i}. {n} buys {b} more {i}. How many {i} does {n} have now?",
    "sub": "{n} has {a} {i} and gives {b} {i} to {m}. How many {i} does {n} have left?",
    "mul": "{n} buys {a} boxes of {i}. Each box holds {b} {i}. How many {i} does {n} buy?",
    "add_sub": "{n} has {a} {i}. {n} finds {b} more {i} and then loses {c}. How many {i} does {n} have now?",
}

# a closed vocabulary: every word belongs to exactly one category
CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "plum", "pear"],
    "animal": ["cat", "dog", "horse", "lion", "mouse", "rabbit", "tiger", "zebra"],
    "color": ["red", "blue", "green", "yellow", "purple", "brown", "black", "white"],
    "vehicle": ["bus", "car", "bicycle", "boat", "plane", "train", "truck", "van"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel", "chisel", "rake", "axe"],
    "drink": ["coffee", "tea", "milk", "juice", "water", "soda", "cocoa", "lemonade"],
    "instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello"],
    "body part": ["arm", "leg", "hand", "foot", "nose", "ear", "knee", "elbow"],
}
MC_HEADER = "The following are multiple choice questions (with answers) about everyday categories.\n\n"
# (a negated "which is not a ..." form was dropped: a model this small stayed at chance on it)
MC_TEMPLATES = {
    "is_a": "Which of the following is {art} {cat}?",
    "kind_of": "{Art} {word} is a kind of what?",
}
LETTERS = "ABCD"


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str   # what the model should generate after the prompt
    answer: str       # the scored answer: the key, the number, or the letter
    kind: str         # arithmetic: the operation; multiple choice: the question type


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def arithmetic(rng: random.Random) -> Example:
    """A word problem whose answer ends in GSM8K's ``#### <number>``; results stay below 100."""
    op = rng.choice(list(ARITH_TEMPLATES))
    n, m = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    c = 0
    if op == "add":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        r, work = a + b, f"{a} + {b} = {a + b}."
    elif op == "sub":
        a = rng.randint(2, 30)
        b = rng.randint(1, a - 1)
        r, work = a - b, f"{a} - {b} = {a - b}."
    elif op == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        r, work = a * b, f"{a} * {b} = {a * b}."
    else:
        a, b = rng.randint(1, 15), rng.randint(1, 15)
        c = rng.randint(1, a + b - 1)
        r, work = a + b - c, f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}."
    q = ARITH_TEMPLATES[op].format(n=n, m=m, i=item, a=a, b=b, c=c)
    return Example(f"Question: {q}\nAnswer:", f" {work}\n#### {r}", str(r), op)


def multiple_choice(rng: random.Random) -> Example:
    """A four-option question in MMLU's prompt form, answered by `` <letter>``."""
    kind = rng.choice(list(MC_TEMPLATES))
    cats = list(CATEGORIES)
    cat = rng.choice(cats)
    others = [c for c in cats if c != cat]
    if kind == "is_a":
        right = rng.choice(CATEGORIES[cat])
        wrong = [rng.choice(CATEGORIES[c]) for c in rng.sample(others, 3)]
        q = MC_TEMPLATES[kind].format(art=article(cat), cat=cat)
    else:
        word = rng.choice(CATEGORIES[cat])
        right, wrong = cat, rng.sample(others, 3)
        q = MC_TEMPLATES[kind].format(Art=article(word).capitalize(), word=word)
    options = wrong + [right]
    rng.shuffle(options)
    letter = LETTERS[options.index(right)]
    body = "".join(f"\n{L}. {o}" for L, o in zip(LETTERS, options))
    return Example(f"{MC_HEADER}{q}{body}\nAnswer:", f" {letter}", letter, kind)


def passkey_examples(tokenizer, length: int, depths: list[float], key_digits: int, seed: int) -> list[Example]:
    """Passkey prompts of ``length`` tokens from the passkey task's own generator, one per depth."""
    samples = passkey.build_samples(tokenizer, [length], depths, 1, key_digits, seed)
    return [Example(s.prompt, f" {s.key}.", s.key, "passkey") for s in samples]


# ---- the toy model's tokenizer -------------------------------------------------------------------

# words (with an optional leading space), single digits, single whitespace, single other characters:
# digits one by one so numbers are spelled the same way wherever they appear (keys, sums, answers)
PRETOKEN = r" ?[A-Za-z]+|[0-9]|\s|[^A-Za-z0-9\s]"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def vocabulary_text() -> str:
    """Every literal string the generators can emit."""
    parts = [passkey.INTRO, *passkey.FILLER, passkey.NEEDLE, passkey.QUESTION, MC_HEADER,
             "Question: Answer:", *NAMES, *ITEMS, *ARITH_TEMPLATES.values(), *MC_TEMPLATES.values(),
             *CATEGORIES, *(w for ws in CATEGORIES.values() for w in ws), "a an A An", *LETTERS]
    return re.sub(r"\{\w+\}", " ", " ".join(parts))


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the generators' closed vocabulary, with every
    printable ASCII character as a fallback token; words outside it map to ``<unk>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(re.findall(r"[A-Za-z]+", vocabulary_text())))
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    tokens = SPECIAL_TOKENS + chars + [w for w in words if len(w) > 1] + [" " + w for w in words]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKEN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # a BOS in front of every prompt, as Llama tokenizers do
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", padding_side="left")
