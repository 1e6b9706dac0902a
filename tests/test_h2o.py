"""H2O (arXiv 2306.14048): a budget covering the sequence is exactly the full cache; with a small
budget the kept tokens are exactly the top scorers plus the recent window; scores are causal, per
sequence (pads ignored) and summed over the query heads of a GQA group; the logical length stays
right after eviction."""

import pytest
import torch
from kv_method_helpers import assert_equals_full_cache, make_handle, make_method

from qeval.kv.cache import cache_kwarg
from qeval.kv.sequence import SequenceState
from qeval.methods.h2o_attention import key_scores


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_budget_covering_the_sequence_equals_the_full_cache_exactly(attn):
    h = make_handle("h2o", attn=attn, heavy_budget=100, recent_budget=100)
    assert_equals_full_cache(h, torch.randint(5, 90, (1, 30)))


def causal(q_len: int, kv_len: int) -> torch.Tensor:
    """(1, 1, q, kv) bool: the newest q keys are this step's queries, causal among them."""
    i = torch.arange(q_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    return (j <= kv_len - q_len + i)[None, None]


def attention_probs(query, key, allowed, scaling):
    """Reference: (B, Hq, q, D) x (B, Hkv, kv, D) -> (B, Hq, q, kv) float32 masked softmax (a fully
    masked row gives zeros)."""
    b, hq, q, d = query.shape
    hkv, kv = key.shape[1], key.shape[-2]
    grouped = query.float().reshape(b, hkv, hq // hkv * q, d)
    scores = (torch.matmul(grouped, key.float().transpose(2, 3)) * scaling).reshape(b, hq, q, kv)
    return torch.nan_to_num(torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1), nan=0.0)


def kept(layer, row=0, head=0) -> torch.Tensor:
    """The kept keys of one (row, head) in position order, whatever the slot layout."""
    keys, valid = layer.keys[row, head], layer.valid[row, head].clone()
    if layer.free is not None:                       # dense decode: the evicted slot awaits reuse
        valid[layer.free[row, head, 0]] = False
    if layer.pos is not None:
        order = layer.pos[row, head].argsort()
        keys, valid = keys[order], valid[order]
    return keys[valid]


def _layer(heavy, recent, mask=None):
    m = make_method("h2o", heavy_budget=heavy, recent_budget=recent).evict
    return m, m.make_cache_layer(0, SequenceState(mask))


def _causal_probs(b, hq, t, seed=0, boost=None):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(b, hq, t, t, generator=g)
    for col, w in (boost or {}).items():
        p[..., col] += w
    p = p.masked_fill(~causal(t, t), 0)
    return p / p.sum(-1, keepdim=True)


def test_planted_heavy_hitters_and_recent_window_are_exactly_what_is_kept():
    m, layer = _layer(heavy=2, recent=2)
    k = torch.arange(10.0).reshape(1, 1, 10, 1).repeat(1, 1, 1, 4)    # key value = its position
    layer.update(k, k.clone())
    probs = _causal_probs(1, 2, 10, boost={3: 20.0, 6: 80.0})        # 2 query heads share 1 KV head
    m.pending.take(0)
    layer.observe(probs)
    assert layer.keys[0, 0, :, 0].tolist() == [3.0, 6.0, 8.0, 9.0]
    assert layer.get_seq_length() == 10 and layer.get_mask_sizes(1) == (5, 0)
    # next token: the slot of position 8 gets almost all attention -> 8 now outranks 6
    new = torch.full((1, 1, 1, 4), 10.0)
    layer.update(new, new.clone())
    m.pending.take(0)
    score_before = dict(zip(layer.keys[0, 0, :, 0].tolist(), layer.score[0, 0].tolist()))
    step = torch.tensor([[[[0.0, 0.0, 0.9, 0.05, 0.05]]]]).repeat(1, 2, 1, 1)
    layer.observe(step)
    # recent window = positions 9, 10; heavy = top 2 of {3, 6, 8} by accumulated score
    total = {p: s + 2 * w for (p, s), w in zip(score_before.items(), [0.0, 0.0, 0.9, 0.05, 0.05])}
    heavy = sorted(sorted([3.0, 6.0, 8.0], key=lambda p: -total[p])[:2])
    assert kept(layer)[:, 0].tolist() == heavy + [9.0, 10.0]
    assert layer.get_seq_length() == 11


def test_scores_are_summed_over_the_query_heads_of_a_gqa_group():
    m, layer = _layer(heavy=100, recent=100)
    k = torch.randn(1, 2, 6, 4)
    layer.update(k, k.clone())
    probs = _causal_probs(1, 4, 6, seed=3)                           # heads 0,1 -> kv 0; 2,3 -> kv 1
    m.pending.take(0)
    layer.observe(probs)
    expected = probs.reshape(1, 2, 2, 6, 6).sum(dim=(2, 3))
    assert torch.allclose(layer.score, expected)


def test_scores_never_credit_a_key_from_an_earlier_query():
    """A purely causal step (no mask): query i of the step's q sees keys up to kv - q + i only."""
    query, key = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    for i in range(4):
        only_i = torch.zeros(1, 2, 4, dtype=torch.bool)
        only_i[..., i] = True
        got = key_scores(query, key, None, 0.3, only_i)
        assert (got[..., 3 + i:] == 0).all() and (got[..., :3 + i] > 0).all(), (i, got)
        assert torch.allclose(got.sum(-1), torch.ones(1, 2)), got       # one query's probabilities


def test_batched_rows_equal_each_sequence_alone_and_ignore_padding():
    mask = torch.tensor([[0, 0, 0] + [1] * 9, [1] * 12])
    m, layer = _layer(heavy=3, recent=2, mask=mask)
    torch.manual_seed(0)
    k = torch.randn(2, 2, 12, 4)
    layer.update(k, k.clone())
    probs = _causal_probs(2, 4, 12, seed=1)
    probs[0, :, :, :3] = 0.7            # garbage on pad keys and from pad queries: must be ignored
    probs[0, :, :3, :] = 0.9
    m.pending.take(0)
    layer.observe(probs)
    for row, start in ((0, 3), (1, 0)):
        m1, alone = _layer(heavy=3, recent=2)
        alone.update(k[row:row + 1, :, start:], k[row:row + 1, :, start:].clone())
        p = probs[row:row + 1, :, start:, start:]
        m1.pending.take(0)
        alone.observe(p)
        for h in range(2):
            kept = layer.keys[row, h][layer.valid[row, h]]
            assert torch.equal(kept, alone.keys[0, h][alone.valid[0, h]])


def test_ratio_budgets_follow_each_prompt_and_the_cache_stays_bounded():
    h = make_handle("h2o", heavy_ratio=0.2, recent_ratio=0.2)
    enc = h.tokenizer(["x" * 40, "y" * 20], return_tensors="pt", padding=True)
    cache = h.new_cache(enc["attention_mask"])
    with torch.no_grad():
        h.model.generate(**enc, **{cache_kwarg(h.model): cache}, max_new_tokens=10, do_sample=False,
                         pad_token_id=h.tokenizer.pad_token_id)
    layer = cache.layers[0]
    n = layer.valid.sum(-1)                                          # (B, H) kept per row and head
    real = [40, 20]
    assert n[0].tolist() == [int(0.2 * real[0]) * 2] * 2 and n[1].tolist() == [int(0.2 * real[1]) * 2] * 2
    assert layer.get_seq_length() == 40 + 9      # the last generated token is never fed back


@pytest.mark.parametrize("chunk", [1 << 20, 7])
def test_chunked_key_scores_equal_the_summed_softmax_probabilities(monkeypatch, chunk):
    """sdpa returns no probabilities, so H2O scores keys in a chunked, causally truncated pass; it
    must equal the plain masked softmax summed over a GQA group's heads and the real queries."""
    from qeval.methods import h2o_attention as ha
    monkeypatch.setattr(ha, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, q, kv, d = 2, 6, 3, 5, 11, 8
    query, key = torch.randn(b, hq, q, d, generator=g), torch.randn(b, hkv, kv, d, generator=g)
    real = torch.ones(b, hkv, q, dtype=torch.bool)
    real[1, :, :2] = False                                          # two pad queries in row 1
    per_row = causal(q, kv).expand(b, hq, q, kv).clone()            # (B, Hq, q, kv), as after eviction
    per_row[1, :, :, :2] = False                                    # row 1: two pad keys hidden
    per_row[1, :, 0, :] = False                                     # and a fully masked pad query
    # None: a purely causal step, masked inside the pass (only each chunk's diagonal block)
    for allowed, reference in ((None, causal(q, kv)), (causal(q, kv), causal(q, kv)), (per_row, per_row)):
        probs = attention_probs(query, key, reference, 0.3) * real.repeat_interleave(2, 1)[..., None]
        expected = probs.reshape(b, hkv, 2, q, kv).sum(dim=(2, 3))
        got = ha.key_scores(query, key, allowed, 0.3, real)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_dense_fast_path_keeps_exactly_what_the_general_path_keeps():
    """Without padding every slot stays valid, the layer skips its validity mask and a decode step
    reuses the evicted slot instead of moving K/V; the kept tokens must be exactly those of the
    general (masked, position-ordered) path, at prefill and every decode step, ties included."""
    g = torch.Generator().manual_seed(5)
    k = torch.randn(1, 2, 24, 4, generator=g)
    probs = _causal_probs(1, 4, 24, seed=2)
    probs[..., 3] = probs[..., 7] = 0.05                          # a tie among candidates
    layers = []
    for dense in (True, False):
        m, layer = _layer(heavy=5, recent=3)
        layer.update(k, k.clone())
        assert layer.dense
        if not dense:                                             # force the general path
            layer.dense, layer.pos, layer._valid = False, None, torch.ones(1, 2, 24, dtype=torch.bool)
        m.pending.take(0)
        layer.observe(probs)
        layers.append((m, layer))
    for step in range(6):
        new = torch.randn(1, 2, 1, 4, generator=g)
        p = torch.rand(1, 4, 1, 9, generator=g)
        for m, layer in layers:
            layer.update(new, new.clone())
            m.pending.take(0)
            layer.observe(p / p.sum(-1, keepdim=True))
        (_, a), (_, b) = layers
        for h in range(2):
            assert torch.equal(kept(a, 0, h), kept(b, 0, h)), (step, h)
        assert a.free is not None and a.keys.shape[2] == 9 and b.keys.shape[2] == 8   # no K/V moved
        assert a.get_seq_length() == 25 + step
    # a multi-token step after decoding: the free slot is dropped and position order restored
    new = torch.randn(1, 2, 3, 4, generator=g)
    p = _causal_probs(1, 4, 11, seed=9)[:, :, -3:]
    for m, layer in layers:
        layer.update(new, new.clone())
        m.pending.take(0)
        layer.observe(p)
    (_, a), (_, b) = layers
    assert a.free is None and torch.equal(a.pos[0, 0], a.pos[0, 0].sort().values)
    for h in range(2):
        assert torch.equal(kept(a, 0, h), kept(b, 0, h)) and kept(a, 0, h).shape[0] == 8
