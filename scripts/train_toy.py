"""Train qeval's embedded toy model: a small Llama (RoPE, GQA) on the synthetic data of qeval.toy.

    python scripts/train_toy.py                      # writes qeval/assets/toy/ (about 20 min on 2 CPU cores)
    python scripts/train_toy.py --out /tmp/toy --steps 50 --finish-steps 10
    python scripts/train_toy.py --out /tmp/pre --finish-steps 0          # pretraining only
    python scripts/train_toy.py --out /tmp/toy --pretrained /tmp/pre     # the finishing phase alone

Everything is seeded (weights, data order, every sample) and runs single-process on the CPU with a
fixed thread count, so the same seed gives the same losses and weights. Pretraining: each step
trains on one batch of arithmetic and multiple-choice examples and, until step 2000 and every
second step after, one batch of passkey prompts (from the passkey task's own generator, lengths
96..1088 tokens with a curriculum that starts short; retrieval is learned by then, and the short
tasks need the steps). Then a short finishing phase (see FINISH_* below) from those weights.

The loss is the usual next-token loss over the whole text, with the prompt down-weighted against
the completion: the filler is easy to predict and would otherwise swamp the few answer tokens, and
a one-letter multiple-choice answer would be a few percent of its example's loss.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from qeval.data import toy

ASSET_DIR = Path(__file__).resolve().parent.parent / "qeval" / "assets" / "toy"

# about 0.65 M parameters: 4 query heads share 2 KV heads (GQA), head_dim 32
ARCH = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
            tie_word_embeddings=True)
MIN_LEN, MAX_LEN = 96, 1088        # passkey prompt lengths trained (the task evaluates 256..1024)
PASSKEY_TOKENS = 1024              # passkey tokens per step: batch = PASSKEY_TOKENS // length
SHORT_BATCH = 24                   # arithmetic + multiple-choice examples per step (half each)
PROMPT_WEIGHT = 0.25               # loss weight of passkey prompt tokens against the key
SHORT_PROMPT_WEIGHT = 0.05         # the same for arithmetic / multiple choice: a one-letter answer
                                   # would otherwise be a few percent of its example's loss
PASSKEY_EVERY_LATE = 2             # after PASSKEY_LATE_STEP, a passkey batch every 2nd step only:
PASSKEY_LATE_STEP = 2000           # retrieval is learned by then, the short tasks need the steps
KEY_DIGITS = 5
RAMP_STEPS = 300                   # passkey curriculum: full length range from this step on
# The finishing phase: a short second run from the pretrained weights (fresh AdamW, low learning
# rate decayed to zero) with a passkey batch every step and a share of keys at the two edges.
# Uniform depths almost never put the key right after the instructions or right before the
# question (round(depth * sentences) is 0, or all sentences, for about 1 % of draws each), and
# those cells were the pretrained model's only misses; oversampling depth 0 from step 0 instead
# slowed everything else (multiple choice stayed at chance).
FINISH_STEPS = 600
FINISH_LR = 5e-4
FINISH_WARMUP = 20
FINISH_EDGE = 0.15                 # share of finishing keys at depth exactly 0, and again at exactly 1
FINISH_SEED_OFFSET = 1_000_003     # the finishing data stream is its own, seeded from the run's seed


def make_model(tokenizer, seed: int, arch: dict = ARCH) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **arch)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def encode(tokenizer, examples, prompt_weight: float = PROMPT_WEIGHT) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) ids with per-token loss weights; prompt ids are BOS + prompt, then the
    completion and EOS (tokenized apart, so the boundary is exactly where generation starts)."""
    rows, weights = [], []
    for ex in examples:
        p = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
        c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + c)
        # weight of predicting token t+1 from position t
        weights.append([prompt_weight] * (len(p) - 1) + [1.0] * len(c))
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    w = torch.zeros((len(rows), T - 1))
    for i, (r, wt) in enumerate(zip(rows, weights)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        w[i, :len(wt)] = torch.tensor(wt)
    return {"input_ids": ids, "attention_mask": mask, "weights": w}


def passkey_length(rng: random.Random, step: int) -> int:
    """Curriculum: the longest length grows linearly over the first RAMP_STEPS steps."""
    top = MIN_LEN + (MAX_LEN - MIN_LEN) * min(1.0, step / RAMP_STEPS)
    return rng.randint(MIN_LEN, int(top))


def edge_or(depth: float, u: float) -> float:
    """Depth 0 with probability FINISH_EDGE, depth 1 with the same, else ``depth``."""
    return 0.0 if u < FINISH_EDGE else 1.0 if u < 2 * FINISH_EDGE else depth


def make_batches(tokenizer, rng: random.Random, step: int, finishing: bool = False):
    pk = None
    if finishing or step < PASSKEY_LATE_STEP or step % PASSKEY_EVERY_LATE == 0:
        length = passkey_length(rng, RAMP_STEPS if finishing else step)  # finishing: the full range
        n = max(1, PASSKEY_TOKENS // length)
        depths = [rng.random() for _ in range(n)]
        if finishing:
            depths = [edge_or(d, rng.random()) for d in depths]
        examples = toy.passkey_examples(tokenizer, length, depths, KEY_DIGITS, rng.randrange(2**31))
        pk = encode(tokenizer, examples)
    short = [toy.arithmetic(rng) for _ in range(SHORT_BATCH // 2)]
    short += [toy.multiple_choice(rng) for _ in range(SHORT_BATCH // 2)]
    return pk, encode(tokenizer, short, SHORT_PROMPT_WEIGHT)


def weighted_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # (B, T, V) -> predictions for positions 1..T-1
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="none")
    w = batch["weights"].flatten()
    return (ce * w).sum() / w.sum()


def lr_at(step: int, peak: float, warmup: int = 50, hold: int = 200) -> float:
    """Linear warmup, a flat stretch, then inverse-square-root decay. It depends on the step
    alone (not on the run's length), so the weights after N steps of a longer run are exactly
    those of a run of N steps: a checkpoint is a shorter run."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * min(1.0, math.sqrt(hold / (step + 1)))


def finish_lr_at(step: int, steps: int, peak: float = FINISH_LR) -> float:
    """Short warmup (the optimizer state is new), then linear decay to zero."""
    if step < FINISH_WARMUP:
        return peak * (step + 1) / FINISH_WARMUP
    return peak * (steps - step) / max(1, steps - FINISH_WARMUP)


def deterministic(fn):
    """Run ``fn`` single-process on 2 threads with deterministic kernels, then leave the process
    as it was (tests train inside a larger session)."""
    def wrapped(*args, **kwargs):
        threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(2)
        torch.use_deterministic_algorithms(True)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(det)
    return wrapped


@deterministic
def train(steps: int, seed: int = 0, lr: float = 4e-3, arch: dict = ARCH, log_every: int = 50, log=print,
          checkpoint=None):
    """Pretraining. Returns (model, tokenizer, losses): one float per step, reproducible bit for bit."""
    tokenizer = toy.build_tokenizer()
    model = make_model(tokenizer, seed, arch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    losses = _loop(model, tokenizer, opt, random.Random(seed), range(steps), lambda step: lr_at(step, lr),
                   False, log_every, log, checkpoint)
    return model, tokenizer, losses


@deterministic
def finish(model, tokenizer, steps: int = FINISH_STEPS, seed: int = 0, log_every: int = 50, log=print):
    """The finishing phase on pretrained weights (in place). Returns the losses, one per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=FINISH_LR, betas=(0.9, 0.95), weight_decay=0.05)
    rng = random.Random(seed + FINISH_SEED_OFFSET)
    return _loop(model, tokenizer, opt, rng, range(steps), lambda step: finish_lr_at(step, steps), True,
                 log_every, log, None)


def _loop(model, tokenizer, opt, rng, step_range, lr_of, finishing, log_every, log, checkpoint):
    model.train()
    losses, start = [], time.perf_counter()
    last = step_range[-1] if len(step_range) else -1
    for step in step_range:
        pk, short = make_batches(tokenizer, rng, step, finishing)
        for g in opt.param_groups:
            g["lr"] = lr_of(step)
        loss_short = weighted_loss(model, short)
        loss_pk = weighted_loss(model, pk) if pk is not None else None
        loss = loss_short if loss_pk is None else loss_pk + loss_short
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == last):
            pk_text = "-" if pk is None else f"{loss_pk.item():.4f} (len {pk['input_ids'].shape[1]})"
            log(f"step {step:5d}  loss {loss.item():.4f}  passkey {pk_text}  short {loss_short.item():.4f}  "
                f"{time.perf_counter() - start:.0f}s")
        if checkpoint and log_every and (step + 1) % log_every == 0:
            checkpoint(model, tokenizer, step + 1)  # equals the final weights of a run of step + 1 steps
    model.eval()
    return losses


def save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--out", type=Path, default=ASSET_DIR)
    ap.add_argument("--finish-steps", type=int, default=FINISH_STEPS, help="0: pretraining only")
    ap.add_argument("--pretrained", type=Path, default=None,
                    help="skip pretraining: finish the weights saved here (by --finish-steps 0 or --checkpoints)")
    ap.add_argument("--checkpoints", type=Path, default=None,
                    help="also save the pretraining weights every 50 steps under this folder")
    args = ap.parse_args()
    start = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.pretrained is None:
        model, tokenizer, _ = train(args.steps, args.seed, args.lr, log=log,
                                    checkpoint=None if args.checkpoints is None else
                                    lambda m, t, n: save(m, t, args.checkpoints / f"step{n}"))
    else:
        tokenizer = toy.build_tokenizer()
        model = LlamaForCausalLM.from_pretrained(args.pretrained, attn_implementation="sdpa", dtype=torch.float32)
    if args.finish_steps:
        log(f"finishing: {args.finish_steps} steps")
        finish(model, tokenizer, args.finish_steps, args.seed, log=log)
    save(model, tokenizer, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {n / 1e6:.2f} M parameters to {args.out} after {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
