"""Diagnostics: per-layer quantization error of a configuration against full precision.

On one fixed text the quantized model and a full-precision reference run the same protocol: the
first ``context_tokens`` are prefilled into a fresh cache, then the rest is fed through it in one
forward (so ``cache`` semantics read stored K/V back, as in generation). For that second forward,
per layer: the relative error ||x - x_fp|| / ||x_fp|| of the keys and values attention used and of
the attention block's output; and the KL divergence KL(p_fp || p) of the final next-token
distributions, averaged over the continuation tokens. Works for any target and method; an
evicting cache (H2O) holds fewer keys than the reference, so its K/V errors are not defined and
only the attention-output and logit rows are written.

The reference is the same model when only the KV cache is quantized under ``cache`` semantics
(a plain ``DynamicCache`` never quantizes); otherwise a second, unquantized copy is loaded from the
run's model config.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from qeval.data.passkey import FILLER
from qeval.errors import ConfigError
from qeval.kv.cache import cache_kwarg
from qeval.model import loading
from qeval.quant.primitives import relative_error
from qeval.tasks import keys


class Recorder:
    """Collects, per layer, the K/V a cache hands to attention and each attention block's output."""

    def __init__(self, model):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.out: dict[int, torch.Tensor] = {}
        self.on = False
        self.hooks = [m.register_forward_hook(self._hook(m.layer_idx))
                      for m in model.modules()
                      if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]

    def _hook(self, idx):
        def hook(module, args, output):
            if self.on:
                self.out[idx] = (output[0] if isinstance(output, tuple) else output).detach().float()
        return hook

    def wrap(self, cache):
        update = cache.update

        def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
            k, v = update(key_states, value_states, layer_idx, *args, **kwargs)
            if self.on:
                self.kv[layer_idx] = (k.detach().float(), v.detach().float())
            return k, v
        cache.update = recording_update
        return cache

    def close(self):
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def measure(model, new_cache, ids: torch.Tensor, context: int):
    """Prefill ``ids[:, :context]``, then record the forward of the rest; returns (recorder, logits, cache)."""
    rec = Recorder(model)
    try:
        mask = torch.ones_like(ids)
        cache = rec.wrap(new_cache(mask[:, :context]))
        kw = {cache_kwarg(model): cache}
        model(input_ids=ids[:, :context], attention_mask=mask[:, :context], **kw, use_cache=True)
        rec.on = True
        logits = model(input_ids=ids[:, context:], attention_mask=mask, **kw, use_cache=True).logits.float()
    finally:
        rec.close()
    return rec, logits, cache


def fixed_text(tokenizer, n_tokens: int, text: str | None) -> torch.Tensor:
    if text is None:
        text = "".join(FILLER[i % len(FILLER)] for i in range(4 * n_tokens))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ConfigError(f"task.quant_error.n_tokens={n_tokens}: the text has only {ids.shape[1]} tokens; "
                          f"allowed: n_tokens <= {ids.shape[1]} or a longer task.quant_error.text")
    return ids


def reference_model(handle, cfg):
    b = handle.method.bits
    if handle.kv_semantics == "cache" and b.w >= 16 and b.a >= 16:
        return handle.model
    model, _ = loading.load(cfg.model, cfg.device, cfg.dtype, cfg.attn, cfg.seed)
    return model


def check(name: str, cfg, model) -> None:
    longest = keys.max_positions(model.arch)
    keys.integer(name, cfg, "n_tokens", 2, longest)
    keys.integer(name, cfg, "context_tokens", 1, cfg.n_tokens - 1)
    if cfg.get("text") is not None:   # a given text must be long enough: asked of the tokenizer, no weights
        fixed_text(model.tokenizer, cfg.n_tokens, cfg.text)


def evaluate(handle, cfg) -> list[dict]:
    ids = fixed_text(handle.tokenizer, cfg.n_tokens, cfg.get("text")).to(handle.device)
    ref = reference_model(handle, cfg)
    fp, fp_logits, _ = measure(ref, lambda m: DynamicCache(config=ref.config), ids, cfg.context_tokens)
    q, q_logits, cache = measure(handle.model, handle.new_cache, ids, cfg.context_tokens)
    handle.stats.observe_cache(cache, handle.method)
    handle.stats.prompt_tokens += 2 * ids.shape[1]
    n = ids.shape[1] - cfg.context_tokens
    rows = []
    for layer in sorted(fp.out):
        k_fp, v_fp = fp.kv[layer]
        k, v = q.kv[layer]
        if handle.kv_semantics == "simulated" and handle.method.quantizes_kv:
            # what the simulated attention sees; static scales are per layer
            static = {"layer_idx": layer} if handle.method.kv_scales is not None else {}
            k, v = handle.method.quantize_kv(k, v, None, **static)
        if k.shape == k_fp.shape:
            rows.append({"metric": "k_rel_error", "layer": layer, "value": relative_error(k_fp, k), "n": n})
            rows.append({"metric": "v_rel_error", "layer": layer, "value": relative_error(v_fp, v), "n": n})
        rows.append({"metric": "attn_out_rel_error", "layer": layer,
                     "value": relative_error(fp.out[layer], q.out[layer]), "n": n})
    log_p, log_q = fp_logits.log_softmax(-1), q_logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)          # (1, n): KL(p_fp || p) per token
    rows.append({"metric": "logits_kl", "value": float(kl.mean()), "n": n})
    return rows
