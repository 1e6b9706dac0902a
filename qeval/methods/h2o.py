"""H2O: heavy-hitter oracle eviction of the KV cache (Zhang et al., arXiv 2306.14048).

Each KV head keeps the tokens with the largest accumulated softmax attention (heavy hitters) plus
a window of the most recent tokens; everything else is evicted for good. Budgets are ratios of
each sequence's prompt (``heavy_ratio``/``recent_ratio``, the paper's 10 % + 10 %) or absolute
counts (``heavy_budget``/``recent_budget``).

- Causal scores: a key's score is the sum of the probabilities that queries have already put on
  it (the prompt's queries at prefill, then each generated token). The reference Llama simulation
  ranks with attention from future queries; here a score never sees a query that comes later.
- Per sequence: scores, budgets and evictions are per batch row (the reference real-drop cache
  sums scores over the batch) and pad keys/queries carry no score.
- GQA: a KV head is kept or dropped for all query heads that share it, so its score is the sum
  over those query heads (and over this step's queries).
- Eviction compacts each (row, head) to its kept slots in position order; rows with fewer kept
  tokens are front-filled with invalid slots that the attention mask hides. ``get_seq_length``
  stays the logical number of tokens seen, so positions keep counting correctly.
- Dense fast path (no padding, equal budgets, the usual batch-1 case): every slot is valid, so
  no mask is built; a decode step marks the evicted slot free and the next token is written
  into it (slots then hold positions out of order, tracked in ``pos``), so no K/V is moved.
  Attention does not depend on slot order; the kept set is exactly the general path's (tested).

Only ``cache`` semantics: eviction is a property of a cache that persists across steps; a single
forward over full K/V (``simulated``) has nothing to evict. K/V are kept in the model's dtype
(H2O does not quantize), so ``kv_bits`` must be 16.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from qeval.errors import ConfigError
from qeval.kv.attention import PendingLayers
from qeval.kv.rows import RowSelectable
from qeval.kv.sequence import SequenceState
from qeval.methods import h2o_attention
from qeval.methods.eviction import FP16_BYTES, EvictPart, eviction_spec


class H2OLayer(RowSelectable, DynamicLayer):
    def __init__(self, method: "H2OEvict", layer_idx: int, seq: SequenceState):
        super().__init__()
        self.method, self.layer_idx, self.seq = method, layer_idx, seq
        self.length = 0                  # logical tokens seen (positions, generate() slicing)
        self._valid = None               # (B, H, W) bool: slot holds a real, kept token
        self.dense = False               # every slot valid (no padding, equal budgets): no mask kept
        # dense decode never moves K/V: the evicted slot is marked free and the next token is
        # written into it, so slots are no longer in position order and ``pos`` says where each is
        self.pos = None                  # (B, H, W) int64 position of each slot (dense only)
        self.free = None                 # (B, H, 1) slot evicted last step, or None
        self.score = None                # (B, H, W) float32 accumulated attention
        self.heavy: list[int] = []       # per row budgets
        self.recent: list[int] = []
        self.compacted = False
        # a recipe's KV part quantizes what this layer keeps (qeval.kv.aging): (B, H, W) bool per
        # stream, True while a slot's token is still full precision
        self.aging = method.aging
        self.raw_keys = self.raw_values = None

    @property
    def valid(self) -> torch.Tensor:
        if self._valid is None:      # dense: built on demand, never stored
            return torch.ones(self.score.shape, dtype=torch.bool, device=self.score.device)
        return self._valid

    def update(self, key_states, value_states, *args, **kwargs):
        b, h, t, _ = key_states.shape
        real = None if self.dense else torch.ones(b, h, t, dtype=torch.bool, device=key_states.device)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            pad = self.seq.pad(0, t, b)
            if pad is not None:
                # (B, 1, T, 1) -> (B, H, T)
                real &= ~pad[:, :, :, 0].expand(b, h, t)
            self.score = torch.zeros(b, h, 0, device=key_states.device)
            if self.aging is not None:
                self.raw_keys = self.raw_values = torch.zeros(b, h, 0, dtype=torch.bool, device=key_states.device)
            self.heavy, self.recent = self.method.budgets(real[:, 0].sum(-1).tolist())
            self._budget_tensors()
            # dense: every (row, head) then keeps the same number of slots, all real, so the
            # decode step needs no mask and no validity bookkeeping
            self.dense = bool(real.all()) and len(set(self.heavy)) == 1 and len(set(self.recent)) == 1
            self._valid = None if self.dense else real[:, :, :0]
            if self.dense:
                real = None
        if self.free is not None and t == 1:
            self._fill_free(key_states, value_states)
        else:
            if self.free is not None:
                self._drop_free()
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            if self.dense:
                new_pos = torch.arange(self.length, self.length + t, device=key_states.device)
                new_pos = new_pos.expand(b, h, t)
                self.pos = new_pos.clone() if self.pos is None else torch.cat([self.pos, new_pos], dim=-1)
            else:
                self._valid = torch.cat([self._valid, real], dim=-1)
            self.score = torch.nn.functional.pad(self.score, (0, t))        # new slots: no score yet
            if self.aging is not None:                                     # new slots: full precision
                fresh = torch.ones(b, h, t, dtype=torch.bool, device=key_states.device)
                self.raw_keys = torch.cat([self.raw_keys, fresh], dim=-1)
                self.raw_values = torch.cat([self.raw_values, fresh], dim=-1)
        self.length += t
        if self.method.pending.take(self.layer_idx) is not None:
            raise RuntimeError("method=h2o: the previous step's attention never reported its scores; the model "
                               "must use the method's attention_implementation (see qeval.run.prepare)")
        self.method.pending.put(self.layer_idx, self)
        return self.keys, self.values

    def _budget_tensors(self) -> None:
        # (B, 1, 1) per-row budgets, built once (and after a beam reorder), not every step
        dev = self.keys.device
        self.heavy_t = torch.tensor(self.heavy, device=dev)[:, None, None]
        self.recent_t = torch.tensor(self.recent, device=dev)[:, None, None]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.keys.shape[-2] if self.is_initialized else 0
        return held + query_length, 0

    def allowed_slots(self, q_len: int, n_query_heads: int) -> torch.Tensor:
        """(B, Hq, q, W) bool: valid slots, causal among this step's q newest slots."""
        w = self.valid.shape[-1]
        i = torch.arange(q_len, device=self.valid.device)[:, None]
        j = torch.arange(w, device=self.valid.device)[None, :]
        causal = j <= w - q_len + i                                   # (q, W)
        rep = n_query_heads // self.valid.shape[1]
        # (B, Hkv, W) -> (B, Hq, 1, W)
        valid = self.valid.repeat_interleave(rep, dim=1)[:, :, None, :]
        return valid & causal

    def observe(self, probs: torch.Tensor) -> None:
        """Add this step's attention, (B, Hq, q, W) float32, to the scores, then evict."""
        b, hq, q, w = probs.shape
        hkv = self.valid.shape[1]
        query_real = self.valid[:, :, -q:].repeat_interleave(hq // hkv, dim=1)      # (B, Hq, q)
        probs = probs * query_real[..., None]
        # (B, Hq, q, W) -> (B, Hkv, Hq // Hkv, q, W) -> sum over shared query heads and queries
        self.add_scores(probs.reshape(b, hkv, hq // hkv, q, w).sum(dim=(2, 3)))

    def add_scores(self, scores: torch.Tensor) -> None:
        """Add this step's attention per key, (B, Hkv, W) float32 summed over the real queries and
        the query heads of each KV head, then evict."""
        if self.dense:
            self.score += scores
            self._evict_dense()
        else:
            self.score += scores * self._valid
            self.evict()
        if self.aging is not None:
            self._age()

    def kept(self) -> torch.Tensor:
        """(B, H, W) bool: the slot holds a kept token (the slot evicted this step on the dense
        path, waiting for the next token, holds none)."""
        kept = self.valid.clone()
        if self.free is not None:
            kept.scatter_(2, self.free, False)
        return kept

    def _age(self) -> None:
        """Quantize the kept tokens that aged out of the KV part's full-precision window."""
        kept = self.kept()
        # dense: ``pos`` orders the slots; otherwise slots are in position order
        newness = self.pos if self.dense else torch.arange(kept.shape[-1], device=kept.device).expand_as(kept)
        self.aging.step(self, newness, kept)

    def _evict_dense(self) -> None:
        """``evict`` when every slot is valid and budgets are equal: the same kept set, with the
        counts known without looking at the tensors. A decode step drops one token by marking its
        slot free (no K/V copy); a larger excess (the prompt) compacts in position order."""
        b, h, w = self.score.shape
        heavy, recent = self.heavy[0], self.recent[0]
        excess = w - heavy - recent
        if excess <= 0:
            return
        if excess == 1:
            # candidates: all but the `recent` newest positions; the lowest score goes, and among
            # equal scores the newest position (as ``evict``)
            cand = self.pos < self.length - recent
            s = torch.where(cand, self.score, float("inf"))
            tie = s == s.amin(-1, keepdim=True)
            self.free = torch.where(tie, self.pos, -1).argmax(-1, keepdim=True)     # (B, H, 1)
            self.compacted = True
            return
        # slots are in position order here (no free slot): the top `heavy` candidates (ties: the
        # older slot), then the recent window
        cand = w - recent
        top = self.score[..., :cand].argsort(dim=-1, descending=True, stable=True)[..., :heavy]
        idx = torch.cat([top.sort(dim=-1).values,
                         torch.arange(cand, w, device=self.score.device).expand(b, h, recent)], dim=-1)
        self._gather(idx)

    def _fill_free(self, key_states, value_states) -> None:
        """A decode step's token goes into the slot evicted last step: (B, H, 1, D) writes only."""
        d = key_states.shape[-1]
        slot = self.free[..., None].expand(-1, -1, -1, d)                            # (B, H, 1, D)
        self.keys.scatter_(2, slot, key_states)
        self.values.scatter_(2, slot, value_states)
        self.pos.scatter_(2, self.free, self.length)
        self.score.scatter_(2, self.free, 0.0)
        if self.aging is not None:
            self.raw_keys.scatter_(2, self.free, True)
            self.raw_values.scatter_(2, self.free, True)
        self.free = None

    def _drop_free(self) -> None:
        """Remove the free slot and restore position order (before a multi-token step)."""
        pos = self.pos.scatter(2, self.free, -1)                                     # free slot first
        self.free = None
        self._gather(pos.argsort(dim=-1)[..., 1:])

    def evict(self) -> None:
        b, h, w = self.valid.shape
        dev = self.valid.device
        heavy, recent = self.heavy_t, self.recent_t
        excess = self.valid.sum(-1, keepdim=True) - heavy - recent                # (B, H, 1)
        if not bool((excess > 0).any()):
            return
        slot = torch.arange(w, device=dev)
        if bool((excess == 1).all()):
            # a decode step: every (row, head) drops exactly its lowest-scoring candidate. Valid
            # slots are always a suffix (pads and evicted slots sit in front), so the recent
            # window is the last `recent` slots. Ties drop the newer slot, as the general path.
            candidate = self.valid & (slot < w - recent)
            cand_score = self.score.masked_fill(~candidate, float("inf"))
            drop = w - 1 - cand_score.flip(-1).argmin(-1, keepdim=True)            # (B, H, 1)
            idx = torch.arange(w - 1, device=dev).expand(b, h, w - 1)
            self._gather(idx + (idx >= drop).long())
            return
        # recent window: the last `recent` valid slots (slots are in position order)
        from_end = self.valid.flip(-1).cumsum(-1).flip(-1)                        # 1 = newest valid
        is_recent = self.valid & (from_end <= recent)
        candidate = self.valid & ~is_recent
        cand_score = self.score.masked_fill(~candidate, float("-inf"))
        # rank of each slot by score among candidates, highest first (ties: the older slot)
        order = cand_score.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, slot.expand(b, h, w))
        is_heavy = candidate & (rank < heavy)
        keep = torch.where(excess > 0, is_recent | is_heavy, self.valid)
        self._compact(keep)

    def _compact(self, keep: torch.Tensor) -> None:
        w = keep.shape[-1]
        new_w = int(keep.sum(-1).max())
        # kept slots last, in position order; invalid slots fill the front
        key = keep.long() * w + torch.arange(w, device=keep.device)
        idx = key.argsort(dim=-1)[..., w - new_w:]                               # (B, H, W')
        self._gather(idx, keep)

    def _gather(self, idx: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Keep slots ``idx`` (B, H, W') of every per-slot tensor."""
        gather = idx[..., None].expand(-1, -1, -1, self.keys.shape[-1])          # (B, H, W', D)
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, gather)
        if not self.dense:
            self._valid = (self._valid if keep is None else keep).gather(-1, idx)
        else:
            self.pos = self.pos.gather(-1, idx)
        self.score = self.score.gather(-1, idx)
        if self.aging is not None:
            self.raw_keys, self.raw_values = self.raw_keys.gather(-1, idx), self.raw_values.gather(-1, idx)
        self.compacted = True

    def packed_bytes(self) -> int:
        """fp16 K and V of the kept tokens."""
        if not self.is_initialized or self.keys.numel() == 0:
            return 0
        if self.aging is not None:
            return self.aging.packed_bytes(self, self.kept())
        kept = int(self.valid.sum()) - (0 if self.free is None else self.free.numel())
        return kept * self.keys.shape[-1] * 2 * FP16_BYTES

    def _n_rows(self) -> int:
        return len(self.heavy)

    def _select_rows(self, idx: torch.Tensor) -> None:
        idx = idx.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
        self.score = self.score.index_select(0, idx)
        if self.aging is not None:
            self.raw_keys, self.raw_values = self.raw_keys.index_select(0, idx), self.raw_values.index_select(0, idx)
        if not self.dense:
            self._valid = self._valid.index_select(0, idx)
        else:
            self.pos = self.pos.index_select(0, idx)
            self.free = None if self.free is None else self.free.index_select(0, idx)
        order = idx.tolist()
        self.heavy = [self.heavy[i] for i in order]
        self.recent = [self.recent[i] for i in order]
        self._budget_tensors()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting KV layer cannot be cropped (evicted tokens are gone)")


def check(cfg) -> None:
    m = cfg.method   # types and ranges are the schema's (qeval.schema.nodes)
    if m.heavy_budget is None and m.recent_budget is None and m.heavy_ratio + m.recent_ratio > 1:
        # the two windows are parts of one prompt: more than all of it is a typo, not a budget
        raise ConfigError(f"method.heavy_ratio={m.heavy_ratio}: with method.recent_ratio={m.recent_ratio} "
                          f"the budget is {m.heavy_ratio + m.recent_ratio:g} of the prompt; allowed: "
                          f"heavy_ratio + recent_ratio <= 1")


class H2OEvict(EvictPart):
    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs)
        self.pending = PendingLayers()   # the layer that took this step, for the attention function

    def budgets(self, prompt_lengths: list[int]) -> tuple[list[int], list[int]]:
        """Per row (heavy, recent) token counts from each sequence's real prompt length."""
        c = self.params
        heavy = [c.heavy_budget if c.heavy_budget is not None else int(c.heavy_ratio * n) for n in prompt_lengths]
        recent = [c.recent_budget if c.recent_budget is not None else int(c.recent_ratio * n) for n in prompt_lengths]
        return heavy, recent

    def budget(self) -> tuple[float | None, int | None]:
        c = self.params
        if c.heavy_budget is None and c.recent_budget is None:
            return c.heavy_ratio + c.recent_ratio, None
        if c.heavy_budget is not None and c.recent_budget is not None:
            return None, c.heavy_budget + c.recent_budget
        return None, None

    def make_cache_layer(self, layer_idx, seq):
        return H2OLayer(self, layer_idx, seq)

    def attention_implementation(self, base: str) -> str | None:
        return h2o_attention.register(self, base)


H2O = eviction_spec("h2o", H2OEvict, quantizes_kept=True, check=check)
