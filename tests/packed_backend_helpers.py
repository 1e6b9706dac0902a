"""What every packed-KV backend test needs: the tiny model, greedy generation of a left-padded
batch through a method's cache, and the checks that hold for any method with ``backend=triton``
(it runs the fused decode, equals ``backend=torch``, and keeps its rows intact under beams and
batch row operations)."""

from __future__ import annotations

import os

import torch
from omegaconf import OmegaConf
from tolerances import network_rounding, sum_rounding
from transformers import LogitsProcessor

from qeval.kv.cache import (
    cache_kwarg,  # noqa: E402
    held_bytes,
)
from qeval.model import loading
from qeval.model.handle import Handle

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# mixed lengths: left padding, rows that compress blocks at different steps
PROMPTS = ["the passkey is 4721. what is it?", "hello there"]


def load_tiny(dtype: str = "float32"):
    cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "qeval", "configs", "model", "tiny-random.yaml"))
    return loading.load(cfg, DEV, dtype, "sdpa", 0)


class _StepRecorder(LogitsProcessor):
    """Called once per generation step, after the forward: snapshots what every cache layer will
    hold for the next step, and optionally forces the next tokens (teacher forcing), so two runs
    can be compared step by step on the same tokens."""

    def __init__(self, cache, force: torch.Tensor | None):
        self.cache, self.force, self.snapshots = cache, force, []

    def __call__(self, input_ids, scores):
        self.snapshots.append([stored_kv(layer) for layer in self.cache.layers])
        if self.force is None:
            return scores
        token = self.force[:, input_ids.shape[1]]
        return torch.full_like(scores, float("-inf")).scatter(1, token[:, None], 0.0)


def stored_kv(layer) -> list[torch.Tensor]:
    """What a compressing layer will hand the next step, per row over its real tokens only: a list
    of (K, V) of (H, T_b, D) each (pad positions are held differently by the two backends)."""
    layer.settle()    # blocks due at the next update compress now (idempotent)
    keys, values = layer.materialize() if hasattr(layer, "materialize") else (layer.keys, layer.values)
    return [(keys[b, :, s:].clone(), values[b, :, s:].clone()) for b, s in enumerate(layer.start)]


def generate(model, tok, method, n_new=18, prompts=PROMPTS, force=None, record=False, **gen):
    """Greedy tokens and per-step logits of the left-padded ``prompts``, through the method's
    cache: (sequences, logits, cache, stats), plus the per-step cache snapshots with ``record``.
    ``force`` (sequences of an earlier run) makes every step take that run's tokens."""
    attn = method.attention_implementation("sdpa")
    model.set_attn_implementation(attn or "sdpa")
    handle = Handle(model, tok, method, "cache")
    enc = tok(prompts, return_tensors="pt", padding=True).to(DEV)
    cache = handle.new_cache(enc["attention_mask"])
    recorder = _StepRecorder(cache, force) if record or force is not None else None
    out = model.generate(**enc, **{cache_kwarg(model): cache}, max_new_tokens=n_new, do_sample=False,
                         pad_token_id=tok.pad_token_id, return_dict_in_generate=True,
                         output_logits=True, logits_processor=[recorder] if recorder else None, **gen)
    model.set_attn_implementation("sdpa")
    handle.stats.observe_cache(cache, method)
    result = (out.sequences, torch.stack(out.logits), cache, handle.stats)
    return result + (recorder.snapshots,) if record else result


def snapshot_gap(a, b) -> tuple[float, float]:
    """(largest |difference|, largest |value|) between two runs' snapshots of one step."""
    gap = mag = 0.0
    for layer_a, layer_b in zip(a, b):
        for (ka, va), (kb, vb) in zip(layer_a, layer_b):
            for x, y in ((ka, kb), (va, vb)):
                gap = max(gap, (x.float() - y.float()).abs().max().item())
                mag = max(mag, x.float().abs().max().item())
    return gap, mag


def compare_backends(model, ref, run) -> dict:
    """Step by step, a run against the reference run on the same tokens (``run`` forced onto
    ``ref``'s). Each is (sequences, logits, snapshots). Returns the steps' logit gaps and which
    steps read caches that agree to rounding (``clean``).

    - A step is clean while every snapshot so far agrees to the rounding of rebuilding a stored
      element (dequantize + corrections: sums of at most head_dim terms). On a clean step the
      logits may differ only by the network's fp32 rounding (tests/tolerances.py).
    - The first steps are clean by construction: the prompt is prefilled in full precision on both
      backends, so its blocks are compressed from identical inputs. Decode-time K/V of deeper
      layers then differ by rounding, and an element within rounding of a code boundary can land
      one code apart (a flip): from there on the backends hold different caches.
    - Wherever the reference's top-2 margin is more than twice the step's gap, the greedy token
      of the run is the reference's."""
    _, ref_logits, ref_snaps = ref
    _, logits, snaps = run
    head_dim = ref_snaps[0][0][0][0].shape[-1]
    gaps, clean, ok = [], [], True
    for step, (a, b) in enumerate(zip(ref_snaps, snaps)):
        kv_gap, kv_mag = snapshot_gap(a, b)
        ok = ok and kv_gap <= sum_rounding(head_dim, kv_mag)
        clean.append(ok)
        gap = (logits[step] - ref_logits[step]).abs().max().item()
        gaps.append(gap)
        if ok:
            bound = network_rounding(model.config, ref_logits[step].abs().max().item())
            assert gap <= bound, f"step {step}: logits differ by {gap:.2e} > rounding bound {bound:.2e}"
        top2 = ref_logits[step].float().topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) > 2 * gap
        agree = logits[step].argmax(-1) == ref_logits[step].argmax(-1)
        assert bool((agree | ~decided).all()), f"step {step}: a decided greedy token differs"
    assert clean[0] and clean[1], "the prompt's blocks were compressed from identical inputs"
    return {"gaps": gaps, "clean": clean}


def check_triton_equals_torch(model, tok, make, layer_cls, monkeypatch, n_new=18):
    """``make(backend, k_bits=None, v_bits=None)`` builds the method. With ``backend=triton``
    every decode step of every layer runs the fused path, the greedy tokens equal torch's, the
    logits agree to float rounding until a code flips (``compare_backends``) while quantization
    itself moves them far more (so the comparison has teeth even where the text does not change), both backends report the same
    packed-layout figure, and the packed cache holds less. Returns the triton cache."""
    ref, ref_logits, ref_cache, ref_stats, ref_snaps = generate(model, tok, make("torch"), n_new, record=True)
    fused_steps = []
    decode = layer_cls.decode
    monkeypatch.setattr(layer_cls, "decode", lambda self, *a: fused_steps.append(1) or decode(self, *a))
    out, logits, cache, stats, snaps = generate(model, tok, make("triton"), n_new, force=ref, record=True)
    assert all(isinstance(layer, layer_cls) for layer in cache.layers)
    assert len(fused_steps) == len(cache.layers) * (n_new - 1), len(fused_steps)
    gaps = compare_backends(model, (ref, ref_logits, ref_snaps), (out, logits, snaps))["gaps"]
    _, full_logits, _, _ = generate(model, tok, make("torch", k_bits=16, v_bits=16), n_new)
    # a flip moves one element by one code; quantization moves every element by up to half a
    # code, and here moves the logits by far more: 50 leaves a decade of margin over the largest
    # flip measured (1e-3 against 0.54, K4V2 GEAR)
    quant_gap = (ref_logits - full_logits).abs().max().item()
    assert quant_gap > 50 * max(gaps), (max(gaps), quant_gap)
    assert stats.kv_bytes_packed == ref_stats.kv_bytes_packed
    assert held_bytes(cache) < held_bytes(ref_cache), (held_bytes(cache), held_bytes(ref_cache))
    return cache


def check_beams_equal_torch(model, tok, make, layer_cls):
    """Beam search reorders the cache's rows every step: every per-row tensor and each row's
    bookkeeping must move together, so the beams equal the torch backend's."""
    # six steps: values are packed at every step and keys since the prefill, so each reorder
    # moves packed words as well as residuals
    ref = generate(model, tok, make("torch"), n_new=6, num_beams=3)[0]
    out, _, cache, _ = generate(model, tok, make("triton"), n_new=6, num_beams=3)
    assert isinstance(cache.layers[0], layer_cls) and cache.layers[0].k_words.shape[0] == 2 * 3
    assert torch.equal(out, ref)


def check_row_operations(model, tok, method):
    """batch_repeat_interleave / batch_select_indices after prefill: every row still reads back
    exactly the K/V it held. Returns the layer after the operations."""
    _, _, cache, _ = generate(model, tok, method, n_new=6)
    layer = cache.layers[1]
    layer.settle()
    keys, values = layer.materialize()
    assert any(layer.dk) and any(layer.dv)
    layer.batch_repeat_interleave(2)
    k2, v2 = layer.materialize()
    assert torch.equal(k2, keys.repeat_interleave(2, dim=0)) and torch.equal(v2, values.repeat_interleave(2, dim=0))
    layer.batch_select_indices(torch.tensor([3, 0]))
    k3, v3 = layer.materialize()
    assert torch.equal(k3, keys[[1, 0]]) and torch.equal(v3, values[[1, 0]])
    assert layer.start[0] > 0 and layer.start[1] == 0    # the short (left-padded) prompt now leads
    return layer


def prefill_cache(model, tok, method, n_tokens: int):
    """The method's cache after one prefill of ``n_tokens`` random tokens (batch 1, no decode);
    returns (cache, its layers' heads, head_dim)."""
    model.set_attn_implementation(method.attention_implementation("sdpa"))
    ids = torch.randint(3, model.config.vocab_size, (1, n_tokens), device=DEV)
    cache = Handle(model, tok, method, "cache").new_cache(torch.ones_like(ids))
    with torch.no_grad():
        model(ids, **{cache_kwarg(model): cache}, use_cache=True)
    model.set_attn_implementation("sdpa")
    return cache, cache.layers[0].k_res.shape[1], cache.layers[0].k_res.shape[3]
