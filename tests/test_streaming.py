"""StreamingLLM (arXiv 2309.17453): generation through the cache equals a full forward whose mask
lets each decode query see only the sinks and its recent window; a covering budget is exactly the
full cache; each row of a left-padded batch keeps its own sinks and window and decodes as alone;
the logical length, beams, row operations, packed bytes, checks and labels hold."""

import os

import pytest
import torch
from omegaconf import OmegaConf
from method_configs import from_knobs
from tolerances import network_rounding
from transformers import DynamicCache

from qeval.errors import ConfigError
from qeval.kv.cache import cache_kwarg
from qeval.kv.sequence import SequenceState
from qeval.methods import METHODS
from qeval.recipe.recipe import Recipe
from qeval.methods.base import Bits, Knobs
from qeval.methods.eviction import FP16_BYTES
from qeval.methods.streaming import StreamingEvict
from qeval.model import loading
from qeval.model.handle import Handle

PROMPT = "the passkey is 4721. remember it, then say it back"       # 50 tokens (characters)
# mixed lengths: the short row is left-padded and both rows evict at prefill
PROMPTS = ["the grass is green. the sky is blue. here we go", "there and back again"]


@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "qeval", "configs", "model", "tiny-random.yaml"))
    return loading.load(cfg, "cpu", "float32", "sdpa", 0)


def make(n_sink=4, recent_ratio=0.2, recent_budget=None) -> Recipe:
    params = OmegaConf.create({"name": "streaming", "n_sink": n_sink, "recent_ratio": recent_ratio,
                               "recent_budget": recent_budget})
    return from_knobs("streaming", params, Knobs(Bits(16, 16, 16, 16)))


@torch.no_grad()
def generate(model, tok, method, prompts, n_new, attn="sdpa", **gen):
    """Greedy generation of the left-padded ``prompts`` through the method's cache (with its
    attention function, as ``qeval.run.prepare`` sets it): (sequences, (steps, B, V) logits,
    cache, prompt width). ``method=None``: a plain ``DynamicCache``."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    if method is None:
        model.set_attn_implementation(attn)
        cache = DynamicCache(config=model.config)
    else:
        model.set_attn_implementation(method.attention_implementation(attn) or attn)
        cache = Handle(model, tok, method, "cache").new_cache(enc["attention_mask"])
    try:
        out = model.generate(**enc, **{cache_kwarg(model): cache}, max_new_tokens=n_new, do_sample=False,
                             pad_token_id=tok.pad_token_id, return_dict_in_generate=True,
                             output_logits=True, **gen)
    finally:
        model.set_attn_implementation("sdpa")
    return out.sequences, torch.stack(out.logits), cache, enc["input_ids"].shape[1]


def streaming_allowed(n: int, prompt_len: int, n_sink: int, recent: int, chunk: int = 1) -> torch.Tensor:
    """(N, N) bool: which keys each query of one unpadded sequence may see. Prompt queries see the
    causal prompt; after it the tokens come in steps of ``chunk``, and a query at position p of a
    step starting at s sees keys j < n_sink, s - recent <= j <= p (a decode step, chunk 1: the
    window p - recent .. p)."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    step_start = prompt_len + (i - prompt_len) // chunk * chunk
    window = (j < n_sink) | (step_start - recent <= j)
    return (j <= i) & ((i < prompt_len) | window)


@torch.no_grad()
def masked_forward(model, ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) of one unpadded sequence ``ids`` (N,) from a single eager forward without a
    cache, under the explicit (N, N) ``allowed`` mask."""
    n = ids.shape[0]
    mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    model.set_attn_implementation("eager")
    try:
        return model(input_ids=ids[None], attention_mask=mask, position_ids=torch.arange(n)[None],
                     use_cache=False).logits[0]
    finally:
        model.set_attn_implementation("sdpa")


def assert_logits_agree(config, got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """(steps, V) logits of two fp32 evaluations of the same attention: within the network's
    rounding, and the same greedy token wherever the reference's top-2 margin decides it."""
    for step, (a, b) in enumerate(zip(got, ref)):
        gap = (a - b).abs().max().item()
        bound = network_rounding(config, b.abs().max().item())
        assert gap <= bound, f"{what} step {step}: logits differ by {gap:.2e} > rounding bound {bound:.2e} " \
                             f"(mean {(a - b).abs().mean().item():.2e})"
        top2 = b.topk(2).values
        if top2[0] - top2[1] > 2 * gap:
            assert a.argmax() == b.argmax(), f"{what} step {step}: a decided greedy token differs"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generation_equals_a_forward_masked_to_sinks_and_recent_window(tiny, attn):
    model, tok = tiny
    n_sink, recent, n_new = 4, 8, 20
    seq, logits, cache, t = generate(model, tok, make(n_sink, recent_budget=recent), [PROMPT], n_new, attn)
    assert cache.layers[0].keys.shape[-2] == n_sink + recent            # it did evict
    # teacher-forced on the cache's own tokens: step k's logits come from position t - 1 + k
    ids = seq[0, :-1]
    ref = masked_forward(model, ids, streaming_allowed(len(ids), t, n_sink, recent))[t - 1:]
    assert_logits_agree(model.config, logits[:, 0], ref, "window")
    # the comparison has teeth: the full cache's logits on the same tokens are far away
    full = masked_forward(model, ids, streaming_allowed(len(ids), t, n_sink, len(ids)))[t - 1:]
    assert (full[1:] - ref[1:]).abs().max() > 1e3 * network_rounding(model.config, ref.abs().max().item())


@torch.no_grad()
def feed(model, method, ids: torch.Tensor, mask: torch.Tensor, steps: list[int], attn="sdpa") -> list[torch.Tensor]:
    """Left-padded ``ids`` (B, N) fed through the method's cache in steps of the given sizes (the
    first is the prompt), positions counted from each row's first real token: each step's
    (B, q, V) logits."""
    model.set_attn_implementation(method.attention_implementation(attn))
    cache = Handle(model, None, method, "cache").new_cache(mask[:, :steps[0]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)                               # (B, N)
    out, start = [], 0
    try:
        for q in steps:
            end = start + q
            out.append(model(input_ids=ids[:, start:end], attention_mask=mask[:, :end],
                             position_ids=pos[:, start:end], **{cache_kwarg(model): cache}, use_cache=True).logits)
            start = end
    finally:
        model.set_attn_implementation("sdpa")
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_multi_token_step_sees_everything_held_and_its_own_tokens_causally(tiny, attn):
    """Eviction follows each step: a 5-token step after the prompt sees the sinks and the window
    held at its start, plus its own tokens up to each query (as the prefill sees the prompt)."""
    model, tok = tiny
    n_sink, recent, chunk = 4, 8, 5
    ids = tok([PROMPT + " ok, 4721."], return_tensors="pt")["input_ids"]       # the prompt, then 2 steps
    t = len(PROMPT)
    steps = [t, chunk, chunk]
    assert ids.shape[1] == sum(steps)
    got = feed(model, make(n_sink, recent_budget=recent), ids, torch.ones_like(ids), steps, attn)
    ref = masked_forward(model, ids[0], streaming_allowed(ids.shape[1], t, n_sink, recent, chunk))
    assert_logits_agree(model.config, torch.cat(got, 1)[0], ref, "chunked")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_multi_token_step_in_a_padded_batch_equals_each_row_alone(tiny, attn):
    model, tok = tiny
    texts = [p + " 12345" for p in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True)
    t = enc["input_ids"].shape[1] - 6
    batched = torch.cat(feed(model, make(recent_ratio=0.25), enc["input_ids"], enc["attention_mask"],
                             [t, 6], attn), 1)
    for row, text in enumerate(texts):
        ids = tok([text], return_tensors="pt")["input_ids"]
        alone = torch.cat(feed(model, make(recent_ratio=0.25), ids, torch.ones_like(ids), [ids.shape[1] - 6, 6],
                               attn), 1)
        assert_logits_agree(model.config, batched[row, -6:], alone[0, -6:], f"row {row}")


def test_the_padded_mask_hides_pad_and_filler_slots_and_every_query_sees_itself():
    """A row still all padding when another row evicts: its pad query would see nothing, so it
    sees its own slot (a fully masked row would make sdpa's output NaN, and NaN times a zero
    probability poisons the real queries that later read that slot)."""
    mask = torch.tensor([[1] * 6, [0, 0, 0, 0, 1, 1]])
    method = make(n_sink=1, recent_budget=1)
    layer = method.make_cache_layer(0, SequenceState(mask))
    k = torch.randn(2, 1, 6, 2)
    layer.update(k[:, :, :3], k[:, :, :3])                 # row 0 keeps positions 0 and 2
    assert layer.compacted and layer.valid.tolist() == [[True, True], [False, False]]
    layer.update(k[:, :, 3:], k[:, :, 3:])
    method.evict.pending.take(0)
    allowed = layer.allowed(3)[:, 0]                        # (B, q, held + q)
    assert allowed[0].tolist() == [[True, True, True, False, False],
                                   [True, True, True, True, False],
                                   [True, True, True, True, True]]
    assert allowed[1].tolist() == [[False, False, True, False, False],     # pad query: itself only
                                   [False, False, False, True, False],
                                   [False, False, False, True, True]]
    assert layer.valid.tolist() == [[True, True], [True, True]] and layer.get_seq_length() == 6
    assert torch.equal(layer.keys[1, 0], k[1, 0, 4:])        # row 1's sink is its first real token


@pytest.mark.parametrize("prompts", [[PROMPT], PROMPTS], ids=["alone", "padded"])
def test_a_budget_covering_the_sequence_is_the_full_cache_bit_for_bit(tiny, prompts):
    model, tok = tiny
    seq, logits, cache, _ = generate(model, tok, make(recent_budget=100), prompts, 12)
    ref_seq, ref_logits, _, _ = generate(model, tok, None, prompts, 12)
    assert torch.equal(seq, ref_seq)
    assert torch.equal(logits, ref_logits), (logits - ref_logits).abs().max()
    assert not cache.layers[0].compacted


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_row_of_a_left_padded_batch_keeps_its_own_sinks_and_window(tiny, attn):
    model, tok = tiny
    seq, logits, cache, t = generate(model, tok, make(n_sink=4, recent_ratio=0.25), PROMPTS, 16, attn)
    layer = cache.layers[0]
    assert layer.compacted and layer.valid is not None
    for row, prompt in enumerate(PROMPTS):
        a_seq, a_logits, a_cache, a_t = generate(model, tok, make(n_sink=4, recent_ratio=0.25), [prompt], 16, attn)
        assert torch.equal(seq[row, t:], a_seq[0, a_t:]), row
        assert_logits_agree(model.config, logits[:, row], a_logits[:, 0], f"row {row}")
        # the same kept tokens as alone (no pad among the sinks), and each row its own budget
        alone = a_cache.layers[0]
        kept = layer.keys[row][:, layer.valid[row]]                           # (H, kept, D)
        assert kept.shape[1] == 4 + int(0.25 * len(prompt)) == alone.keys.shape[-2]
        assert torch.allclose(kept, alone.keys[0], atol=1e-5), row


def test_the_logical_length_counts_every_token_while_the_cache_stays_bounded(tiny):
    model, tok = tiny
    _, _, cache, t = generate(model, tok, make(n_sink=4, recent_budget=6), [PROMPT], 10)
    layer = cache.layers[1]
    assert cache.get_seq_length() == layer.get_seq_length() == t + 10 - 1   # the last token is never fed back
    assert layer.keys.shape[-2] == 10 and layer.valid is None
    assert layer.get_mask_sizes(1) == (11, t + 9 - 10)
    h, d = layer.keys.shape[1], layer.keys.shape[-1]
    assert layer.packed_bytes() == 10 * h * d * 2 * FP16_BYTES


def test_packed_bytes_count_each_rows_kept_tokens(tiny):
    model, tok = tiny
    _, _, cache, _ = generate(model, tok, make(n_sink=4, recent_ratio=0.25), PROMPTS, 8)
    layer = cache.layers[0]
    h, d = layer.keys.shape[1], layer.keys.shape[-1]
    kept = sum(4 + int(0.25 * len(p)) for p in PROMPTS)
    assert layer.packed_bytes() == kept * h * d * 2 * FP16_BYTES


@pytest.mark.parametrize("prompts", [[PROMPT], PROMPTS], ids=["alone", "padded"])
def test_beam_search_runs(tiny, prompts):
    model, tok = tiny
    seq, _, cache, t = generate(model, tok, make(n_sink=4, recent_ratio=0.25), prompts, 8, num_beams=3)
    assert seq.shape[0] == len(prompts) and seq.shape[1] > t
    layer = cache.layers[0]
    assert layer.keys.shape[0] == len(layer.recent) == 3 * len(prompts)


def test_row_operations_move_every_rows_state(tiny):
    model, tok = tiny
    _, _, cache, _ = generate(model, tok, make(n_sink=4, recent_ratio=0.25), PROMPTS, 6)
    layer = cache.layers[1]
    keys, valid, recent = layer.keys.clone(), layer.valid.clone(), list(layer.recent)
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.keys, keys.repeat_interleave(2, 0)) and layer.recent == [recent[0]] * 2 + [recent[1]] * 2
    layer.batch_select_indices(torch.tensor([3, 0]))
    assert torch.equal(layer.keys, keys[[1, 0]]) and torch.equal(layer.valid, valid[[1, 0]])
    assert layer.recent == recent[::-1] and layer.recent_t[:, 0].tolist() == recent[::-1]


def test_a_padded_batch_without_the_attention_function_is_refused(tiny):
    model, tok = tiny
    method = make(n_sink=4, recent_ratio=0.25)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    cache = Handle(model, tok, method, "cache").new_cache(enc["attention_mask"])
    with pytest.raises(RuntimeError, match="attention_implementation"), torch.no_grad():
        model.generate(**enc, **{cache_kwarg(model): cache}, max_new_tokens=4, do_sample=False,
                       pad_token_id=tok.pad_token_id)


def test_crop_is_refused(tiny):
    model, tok = tiny
    _, _, cache, _ = generate(model, tok, make(recent_budget=4), [PROMPT], 3)
    with pytest.raises(NotImplementedError, match="evicted"):
        cache.layers[0].crop(1)


@pytest.mark.parametrize("key, value", [
    ("n_sink", -1), ("n_sink", 2.5), ("n_sink", True), ("recent_ratio", 1.5), ("recent_ratio", -0.1),
    ("recent_ratio", "half"), ("recent_budget", -3), ("recent_budget", 0.5),
])
def test_bad_parameters_are_one_line_config_errors(key, value):
    params = {"name": "streaming", "n_sink": 4, "recent_ratio": 0.2, "recent_budget": None} | {key: value}
    from method_configs import check_params

    from qeval.schema.types import shown
    with pytest.raises(ConfigError) as err:
        check_params(OmegaConf.create({"method": params}))
    msg = str(err.value)
    assert msg.startswith(f"method.{key}={shown(value)}: ") and "\n" not in msg, msg


def test_rows_are_labelled_by_the_budget_kept():
    assert make(recent_ratio=0.2).labels() == {"target": "KV-evict", "setting": "KV 20%", "kv_budget": 0.2}
    assert make(n_sink=4, recent_budget=8).labels() == {"target": "KV-evict", "setting": "KV 12 tok",
                                                        "kv_budget": None}
    assert METHODS["streaming"].parts == {"evict": StreamingEvict} and METHODS["streaming"].evicts
