"""Build a tiny model + handle for a KV method the way ``qeval.run.prepare`` does."""

from __future__ import annotations

import torch
from method_configs import CONTRACT
from method_configs import make_method as make_from_yaml
from method_configs import make_part as part_from_yaml
from tiny_models import tiny_model
from transformers import DynamicCache

from qeval.kv import simulated
from qeval.kv.cache import cache_kwarg
from qeval.model.handle import Handle


def make_method(name: str, bits: int = 16, semantics: str = "cache", **overrides):
    """A KV method from its YAML with its contract settings (small groups so short test prompts
    cross several blocks; tiny llama: head_dim 16) and ``overrides``."""
    return make_from_yaml(name, bits, semantics, **(CONTRACT[name][0] | overrides))


def make_part(name: str, bits: int = 16, semantics: str = "cache", **overrides):
    """The KV or evict part of ``name`` at its contract settings (its own API: GEAR's ``compress``)."""
    return part_from_yaml(name, bits, semantics, **(CONTRACT[name][0] | overrides))


def make_handle(name: str, bits: int = 16, semantics: str = "cache", attn: str = "sdpa", **overrides):
    model, tok = tiny_model("llama", attn=attn)
    method = make_method(name, bits, semantics, **overrides)
    if semantics == "simulated":
        simulated.install(model, method, attn)
    elif (impl := method.attention_implementation(attn)) is not None:
        model.set_attn_implementation(impl)
    return Handle(model, tok, method, semantics)


@torch.no_grad()
def greedy_loop(model, cache, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A manual decode loop (no ``generate``): prefill, then one token at a time; (tokens, logits)."""
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache}, use_cache=True)
    logits, tokens = [out.logits[:, -1]], []
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], -1)
        out = model(input_ids=nxt, attention_mask=mask, **{cache_kwarg(model): cache}, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.cat(tokens, -1), logits


def assert_equals_full_cache(handle, ids: torch.Tensor, steps: int = 12) -> None:
    """The method's cache decodes ``ids`` exactly as an unquantized ``DynamicCache``: the same
    tokens and bit-identical logits at every step."""
    tok_m, logits_m = greedy_loop(handle.model, handle.new_cache(torch.ones_like(ids)), ids, steps)
    tok_f, logits_f = greedy_loop(handle.model, DynamicCache(config=handle.model.config), ids, steps)
    assert torch.equal(tok_m, tok_f)
    for a, b in zip(logits_m, logits_f):
        assert torch.equal(a, b), (a - b).abs().max()
