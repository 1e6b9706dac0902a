"""Every KV method (one row per method x semantics) on a tiny GQA llama: a sequence alone and inside
a left-padded batch decode the same; beam search runs; a manual decode loop matches generate();
the cache reports the bytes it holds and a packed layout smaller than that when it quantizes."""

import pytest
import torch
from kv_method_helpers import greedy_loop, make_handle

from qeval.kv.cache import cache_kwarg

CASES = [
    ("kivi", 2, "cache"), ("kivi", 4, "simulated"),
    ("gear", 2, "cache"), ("gear", 4, "simulated"),
    ("h2o", 16, "cache"),
]
IDS = [f"{m}-{b}bit-{s}" for m, b, s in CASES]
PROMPTS = ["The grass is green. The sky is blue. The sun is yellow. Here we go.",
           "There and back again. The pass key is 12345.",
           "Short one."]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def handle(request):
    name, bits, semantics = request.param
    return make_handle(name, bits, semantics)


def test_alone_equals_left_padded_batch(handle):
    batched = handle.generate(PROMPTS, max_new_tokens=16)
    alone = [handle.generate([p], max_new_tokens=16)[0] for p in PROMPTS]
    assert batched == alone


def test_beam_search_runs_with_padding(handle):
    out = handle.generate(PROMPTS[:2], max_new_tokens=8, num_beams=3)
    assert len(out) == 2 and all(len(o) > 0 for o in out)


def test_manual_decode_loop_matches_generate(handle):
    enc = handle.tokenizer([PROMPTS[0]], return_tensors="pt")
    ids = enc["input_ids"]
    tokens, _ = greedy_loop(handle.model, handle.new_cache(torch.ones_like(ids)), ids, 16)
    gen = handle.generate([PROMPTS[0]], max_new_tokens=16)[0]
    assert handle.tokenizer.decode(tokens[0], skip_special_tokens=True) == gen


def test_rows_expanded_then_selected_keep_decoding_as_before(handle):
    """batch_repeat_interleave and batch_select_indices on a prefilled cache (a caller that expands
    or prunes rows between steps): every row's bookkeeping moves with its K/V, so each copy keeps
    decoding exactly as the cache that was never touched."""
    if handle.kv_semantics != "cache":
        pytest.skip("simulated semantics keeps a plain DynamicCache")
    model = handle.model
    ids = handle.tokenizer([PROMPTS[0]], return_tensors="pt")["input_ids"]
    ref, _ = greedy_loop(model, handle.new_cache(torch.ones_like(ids)), ids, 14)
    cache, mask, steps = handle.new_cache(torch.ones_like(ids)), torch.ones_like(ids), []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache}, use_cache=True)
        for step in range(14):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(nxt[:, 0])
            if step == 4:                      # one row -> three
                cache.batch_repeat_interleave(3)
                nxt, mask = nxt.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
            if step == 9:                      # keep rows 0 and 2
                keep = torch.tensor([0, 2])
                cache.batch_select_indices(keep)
                nxt, mask = nxt[keep], mask[keep]
            mask = torch.cat([mask, torch.ones_like(nxt)], -1)
            out = model(input_ids=nxt, attention_mask=mask, **{cache_kwarg(model): cache}, use_cache=True)
    for step, toks in enumerate(steps):
        assert (toks == ref[0, step]).all(), (step, toks, ref[0])


def test_bytes_held_and_packed_are_reported(handle):
    handle.stats.__init__()
    handle.generate(PROMPTS, max_new_tokens=16)
    s = handle.stats
    if handle.kv_semantics == "simulated":
        # a plain DynamicCache holds full-precision K/V: quantization happens in attention
        assert s.kv_bytes_held > 0
        return
    assert s.kv_bytes_held > 0 and 0 < s.kv_bytes_packed < s.kv_bytes_held


def test_h2o_keeps_fewer_bytes_than_the_full_cache():
    full = make_handle("h2o", heavy_budget=10_000, recent_budget=0)
    small = make_handle("h2o")
    full.generate(PROMPTS, max_new_tokens=8)
    small.generate(PROMPTS, max_new_tokens=8)
    assert small.stats.kv_bytes_held < full.stats.kv_bytes_held / 2
