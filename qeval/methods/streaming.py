"""StreamingLLM: attention sinks plus a recent window (Xiao et al., arXiv 2309.17453).

The cache keeps each sequence's first ``n_sink`` real tokens (the attention sinks; the paper keeps
4) and its most recent tokens; everything in between is evicted for good. The window is
``recent_ratio`` of each sequence's real prompt (``int(recent_ratio * prompt)``, rounded as H2O's
budgets) or ``recent_budget`` tokens when set; the sinks come on top of it.

- Positions: the cache holds post-RoPE keys, so a kept token keeps its original position and
  nothing is re-rotated, as kvpress's ``StreamingLLMPress`` does. (The paper's code caches keys
  before RoPE and numbers positions within the cache; a post-RoPE cache cannot.)
- Eviction follows each step: a step's queries attend to everything held plus the step's own
  tokens (causal among them), then the cache drops what fell out. So the prefill attends over the
  whole prompt, and the decode query at position p sees the sinks, positions p - recent .. p - 1
  and itself.
- Dense path (no left padding, the usual batch-1 case, so every row has the same budget): the held
  slots are the sinks then the window, all real, in position order. ``get_mask_sizes`` places them
  as the last positions before this step (``kv_offset``, as transformers' sliding-window layers
  do), so the model's own causal mask is right and no attention function is involved.
- Padded path: each row keeps its own sinks (its first real tokens, never pads) and its own
  budget, compacted to its kept slots in position order and front-filled with invalid slots. The
  slots then no longer line up with positions, so the attention function registered here applies
  the layer's validity mask instead of transformers' (which reads slot j as a position). Until a
  row first evicts, nothing has moved and the model's own mask serves.

Only ``cache`` semantics and ``kv_bits=16`` (:class:`EvictPart`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from qeval.kv.attention import PendingLayers, register_attention
from qeval.kv.attention import attention_mask as masked
from qeval.kv.rows import RowSelectable
from qeval.kv.sequence import SequenceState
from qeval.methods.eviction import EvictPart, eviction_spec


class StreamingLayer(RowSelectable, DynamicLayer):
    is_croppable = False

    def __init__(self, method: "StreamingEvict", layer_idx: int, seq: SequenceState):
        super().__init__()
        self.method, self.layer_idx, self.seq = method, layer_idx, seq
        self.length = 0                  # logical tokens seen, pads included (positions, generate() slicing)
        self.recent: list[int] = []      # per-row window length
        self.valid = None                # (B, W) bool: slot holds a real, kept token; None: dense, all do
        self.step_valid = None           # (B, W + q) the same for what the last update returned
        self.compacted = False           # slots no longer line up with positions: attention needs our mask
        # a recipe's KV part quantizes what this layer keeps (qeval.kv.aging): (B, H, W) bool per
        # stream, True while a slot's token is still full precision; slots are in position order
        self.aging = method.aging
        self.raw_keys = self.raw_values = None

    def update(self, key_states, value_states, *args, **kwargs):
        b, h, t, _ = key_states.shape
        if not self.is_initialized:
            self._start(key_states, value_states)
        else:
            self.settle()   # the previous step has attended: what aged since is quantized now
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        if self.aging is not None:
            fresh = torch.ones(b, h, t, dtype=torch.bool, device=keys.device)
            self.raw_keys = torch.cat([self.raw_keys, fresh], dim=-1)
            self.raw_values = torch.cat([self.raw_values, fresh], dim=-1)
        if self.valid is not None:
            pad = self.seq.pad(self.length, t, b)
            # (B, 1, t, 1) -> (B, t)
            real = torch.ones(b, t, dtype=torch.bool, device=keys.device) if pad is None else ~pad[:, 0, :, 0]
            self.step_valid = torch.cat([self.valid, real], dim=-1)
        self.length += t
        if self.compacted:
            if self.method.pending.take(self.layer_idx) is not None:
                raise RuntimeError("method=streaming: the previous step's attention never took its mask; the "
                                   "model must use the method's attention_implementation (see qeval.run.prepare)")
            self.method.pending.put(self.layer_idx, self)
        self._evict(keys, values)
        return keys, values

    def _start(self, key_states, value_states) -> None:
        b, _, t, _ = key_states.shape
        self.lazy_initialization(key_states, value_states)
        self.method.pending.take(self.layer_idx)       # a hand-off left by an abandoned forward
        pad = self.seq.pad(0, t, b)
        # (B, 1, T, 1) -> (B,) real prompt tokens per row
        prompt = [t] * b if pad is None else (~pad[:, 0, :, 0]).sum(-1).tolist()
        self.recent = self.method.windows(prompt)
        self._recent_tensor()
        if pad is not None:
            self.valid = torch.zeros(b, 0, dtype=torch.bool, device=key_states.device)
        if self.aging is not None:
            h = key_states.shape[1]
            self.raw_keys = torch.zeros(b, h, 0, dtype=torch.bool, device=key_states.device)
            self.raw_values = torch.zeros(b, h, 0, dtype=torch.bool, device=key_states.device)

    def _recent_tensor(self) -> None:
        # (B, 1) per-row windows, built once (and after a row reorder), not every step
        self.recent_t = torch.tensor(self.recent, device=self.keys.device)[:, None]

    def _evict(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store what the next step may see: each row's first ``n_sink`` real tokens and its last
        ``recent`` ones, out of this step's (B, H, W + q, D) K/V."""
        n_sink = self.method.params.n_sink
        if self.valid is None:
            # dense: every slot real and in position order, one budget for all rows
            w, recent = keys.shape[-2], self.recent[0]
            if w > n_sink + recent:
                # (B, H, W, D) -> (B, H, n_sink + recent, D)
                keys = torch.cat([keys[:, :, :n_sink], keys[:, :, w - recent:]], dim=-2)
                values = torch.cat([values[:, :, :n_sink], values[:, :, w - recent:]], dim=-2)
                if self.aging is not None:
                    self.raw_keys = torch.cat([self.raw_keys[..., :n_sink], self.raw_keys[..., w - recent:]], -1)
                    self.raw_values = torch.cat([self.raw_values[..., :n_sink], self.raw_values[..., w - recent:]], -1)
            self.keys, self.values = keys, values
            return
        valid = self.step_valid
        first = valid.cumsum(-1)                                   # 1 = the row's first real token
        last = valid.flip(-1).cumsum(-1).flip(-1)                  # 1 = the row's newest token
        keep = valid & ((first <= n_sink) | (last <= self.recent_t))
        if bool((keep == valid).all()):                            # nothing falls out: nothing moves
            self.keys, self.values, self.valid = keys, values, valid
            return
        w = valid.shape[-1]
        new_w = int(keep.sum(-1).max())
        # kept slots last, in position order; the front of a row with fewer is invalid filler
        order = (keep.long() * w + torch.arange(w, device=keep.device)).argsort(dim=-1)
        idx = order[:, w - new_w:]                                             # (B, W')
        gather = idx[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])  # (B, H, W', D)
        self.keys, self.values = keys.gather(2, gather), values.gather(2, gather)
        if self.aging is not None:
            slots = idx[:, None, :].expand(-1, keys.shape[1], -1)                    # (B, H, W')
            self.raw_keys, self.raw_values = self.raw_keys.gather(-1, slots), self.raw_values.gather(-1, slots)
        self.valid = keep.gather(-1, idx)
        self.compacted = True

    def _kept(self) -> torch.Tensor:
        """(B, H, W) bool: the slot holds a real, kept token."""
        if self.valid is None:
            return torch.ones_like(self.raw_keys)
        return self.valid[:, None, :].expand_as(self.raw_keys)

    def settle(self) -> None:
        """Quantize the kept tokens that aged out of the KV part's full-precision window
        (idempotent; slots are in position order, so a slot's index orders it)."""
        if self.aging is None or not self.is_initialized or self.keys.numel() == 0:
            return
        kept = self._kept()
        self.aging.step(self, torch.arange(kept.shape[-1], device=kept.device).expand(kept.shape), kept)

    def allowed(self, q_len: int) -> torch.Tensor:
        """(B, 1, q, W + q) bool for the step just taken: the real held slots, causal among the
        step's own q slots. A query always sees its own slot, so a pad query's softmax stays
        finite (its output is never used)."""
        w = self.step_valid.shape[-1]
        i = torch.arange(q_len, device=self.step_valid.device)[:, None]
        j = torch.arange(w, device=self.step_valid.device)[None, :]
        causal = j <= w - q_len + i                                            # (q, W + q)
        return (self.step_valid[:, None, None, :] & causal) | (j == w - q_len + i)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the held slots read as the positions just before this step: true on the dense path, and
        # the padded path's own mask replaces transformers' once slots and positions part ways
        held = self.keys.shape[-2] if self.is_initialized else 0
        return held + query_length, self.length - held

    def packed_bytes(self) -> int:
        """fp16 K and V of the kept tokens."""
        if not self.is_initialized or self.keys.numel() == 0:
            return 0
        if self.aging is not None:
            self.settle()
            return self.aging.packed_bytes(self, self._kept())
        keys, values = self.keys, self.values
        if self.valid is not None:
            # (B, H, W, D) -> (B, W, H, D) -> (kept, H, D): invalid filler slots are not kept tokens
            keys, values = keys.transpose(1, 2)[self.valid], values.transpose(1, 2)[self.valid]
        return self.method.kv_packed_bytes(keys, values)

    def _n_rows(self) -> int:
        return len(self.recent)

    def _select_rows(self, idx: torch.Tensor) -> None:
        idx = idx.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
        if self.aging is not None:
            self.raw_keys, self.raw_values = self.raw_keys.index_select(0, idx), self.raw_values.index_select(0, idx)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, idx)
        self.recent = [self.recent[i] for i in idx.tolist()]
        self._recent_tensor()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting KV layer cannot be cropped (evicted tokens are gone)")


class StreamingEvict(EvictPart):
    def __init__(self, spec, params, knobs):
        super().__init__(spec, params, knobs)
        self.pending = PendingLayers()   # the padded path's layer that took this step, for the attention

    def windows(self, prompt_lengths: list[int]) -> list[int]:
        """Per row recent-window length from each sequence's real prompt length."""
        c = self.params
        return [c.recent_budget if c.recent_budget is not None else int(c.recent_ratio * n)
                for n in prompt_lengths]

    def budget(self) -> tuple[float | None, int | None]:
        """The window's fraction of the prompt (the ``n_sink`` sinks come on top), or the whole
        count when the window is a count."""
        c = self.params
        if c.recent_budget is None:
            return c.recent_ratio, None
        return None, c.n_sink + c.recent_budget

    def make_cache_layer(self, layer_idx, seq):
        return StreamingLayer(self, layer_idx, seq)

    def attention_implementation(self, base: str) -> str | None:
        """``base`` attention with the padded path's mask swapped in; a dense step (nothing
        pending) runs ``base`` unchanged."""
        def make(attend):
            def attention(module, query, key, value, attention_mask, **kwargs):
                layer = self.pending.take(module.layer_idx)
                if layer is not None:
                    allowed = layer.allowed(query.shape[-2])                 # (B, 1, q, kv)
                    attention_mask = masked(allowed, base, query.dtype)
                return attend(module, query, key, value, attention_mask, **kwargs)
            return attention

        return register_attention("streaming", base, make)


STREAMING = eviction_spec("streaming", StreamingEvict, quantizes_kept=True)
