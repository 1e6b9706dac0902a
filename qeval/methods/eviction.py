"""What every eviction method shares: it compresses the cache by dropping tokens, not bits.

An eviction method (H2O, StreamingLLM) keeps K/V at the model's precision (``kv_bits`` must be
16), needs its own cache whatever the bits, has no one-pass ``simulated`` form (a
single forward over full K/V has nothing to evict), and labels its rows by the budget it keeps, so
the report needs no knowledge of any method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from qeval.methods.parts import Part
from qeval.methods.spec import Spec
from qeval.recipe.slot_names import EVICT

FP16_BYTES = 2


class EvictPart(Part, ABC):
    # set by a recipe whose KV part quantizes the kept tokens (qeval.kv.aging); None: fp16 cache
    aging = None

    @abstractmethod
    def budget(self) -> tuple[float | None, int | None]:
        """What the cache keeps: (fraction of each prompt, None) or (None, token count)."""

    @abstractmethod
    def make_cache_layer(self, layer_idx: int, seq):
        """One layer of the evicting cache."""

    @abstractmethod
    def attention_implementation(self, base: str) -> str | None:
        """The registered attention function its cache needs on top of ``base``."""

    def kv_packed_bytes(self, keys, values) -> int:
        """The kept tokens at fp16."""
        return (keys.numel() + values.numel()) * FP16_BYTES

    def labels(self) -> dict:
        budget, tokens = self.budget()
        if budget is not None and budget >= 1:   # nothing evicted: the full-cache baseline
            return {"target": "fp16", "setting": "fp16", "kv_budget": budget}
        setting = f"KV {budget:.0%}" if budget is not None else f"KV {tokens} tok"
        return {"target": "KV-evict", "setting": setting, "kv_budget": budget}


def eviction_spec(name: str, part, **kw) -> Spec:
    """An eviction method's row: it keeps K/V at the model's precision (``kv_bits`` 16) and has no
    one-pass ``simulated`` form."""
    return Spec(name, {EVICT: part}, allowed_bits=(16,), semantics=("cache",), **kw)
