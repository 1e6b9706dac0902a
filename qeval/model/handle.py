"""What a task evaluates: the (already quantized) model, its tokenizer and a cache factory.

Tasks never look at the method. They ask the handle for a fresh cache per batch (so a KV method
is on the path of every generation) and read back the measured statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from qeval.kv.cache import QevalCache, cache_kwarg, held_bytes, packed_layout_bytes
from qeval.logs import Progress
from qeval.recipe.recipe import Recipe


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    kv_bytes_held: int = 0        # the largest cache measured, in bytes of its tensors
    kv_bytes_packed: int = 0      # what a packed layout of that cache would need

    def observe_cache(self, cache, method: Recipe) -> None:
        held = held_bytes(cache)
        if held > self.kv_bytes_held:
            self.kv_bytes_held = held
            self.kv_bytes_packed = packed_layout_bytes(cache, method)


@dataclass
class Handle:
    model: torch.nn.Module
    tokenizer: object
    method: Recipe
    kv_semantics: str = "cache"
    stats: Stats = field(default_factory=Stats)
    run_dir: object = None        # the run directory, where tasks may keep per-sample outputs

    def progress_bar(self, total: int, desc: str, unit: str = "sample"):
        """Progress through a task's samples: a bar on a terminal, steady log lines otherwise
        (:class:`qeval.logs.Progress`), with the tokens processed so far."""
        return Progress(total, desc, unit, detail=lambda: f"{self.stats.prompt_tokens} prompt tokens, "
                                                          f"{self.stats.generated_tokens} generated")

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def new_cache(self, attention_mask: torch.Tensor | None = None):
        """A fresh cache for one batch. ``cache`` semantics and a method that quantizes or evicts
        K/V: the method's own cache; otherwise a plain ``DynamicCache`` (under ``simulated`` the
        attention function does the quantizing)."""
        if self.kv_semantics == "cache" and self.method.needs_cache:
            n_layers = self.model.config.get_text_config().num_hidden_layers
            return QevalCache(self.method, n_layers, attention_mask)
        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, **gen_kwargs) -> list[str]:
        """Greedy (unless told otherwise) continuation of each prompt, left-padded as a batch."""
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        cache = self.new_cache(enc["attention_mask"])
        gen_kwargs.setdefault("do_sample", False)
        out = self.model.generate(**enc, **{cache_kwarg(self.model): cache}, max_new_tokens=max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id, **gen_kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        self.stats.prompt_tokens += int(enc["attention_mask"].sum())
        self.stats.generated_tokens += int((new != self.tokenizer.pad_token_id).sum())
        self.stats.observe_cache(cache, self.method)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)
