"""lm-eval's ``HFLM`` over an already-quantized model, with the method's KV cache on the path.

Stock ``HFLM`` never passes a cache: ``generate()`` builds a plain ``DynamicCache`` and
log-likelihoods are scored in one forward pass over context + continuation. Under the ``cache``
semantics (KIVI, GEAR: prefill attends in full precision, only what is stored is quantized) a
one-pass score therefore never reads a quantized K/V, and MMLU-style tasks cannot move.

``QevalLM`` changes exactly two things:

* every ``generate()`` gets ``handle.new_cache(attention_mask)`` as its cache;
* ``scoring="prefill"`` scores a (context, continuation) pair in two steps, as a server would
  after a prompt is cached: the context minus its last token is prefilled into a fresh method
  cache, then the last context token and the continuation (minus its last token) are fed through
  that cache. Every scored logit is computed by a query that reads the stored (quantized) context,
  including the first continuation token, which is what a single-token answer ("A", "B", ...)
  depends on. ``scoring="stock"`` keeps lm-eval's one-pass scoring.

With 16 bits the cache is a plain ``DynamicCache`` and both paths reproduce stock ``HFLM``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

from qeval.errors import ConfigError
from qeval.kv.cache import cache_kwarg

SCORINGS = ("prefill", "stock")
TRUNCATIONS = ("left", "middle")


class QevalLM(HFLM):
    def __init__(self, handle, *, scoring: str = "prefill", batch_size: int = 1,
                 max_length: int | None = None, truncation: str = "left",
                 max_input_tokens: int | None = None, chat_template=None):
        """``handle``: a :class:`qeval.handle.Handle`. ``truncation="middle"`` keeps the first and
        last halves of a generation prompt longer than ``max_input_tokens`` (LongBench,
        arXiv:2308.14508); ``"left"`` is lm-eval's own left truncation. ``chat_template``: a
        callable ``(task_name) -> bool`` saying whether to wrap that task's prompts in the
        tokenizer's chat template (only when the tokenizer has one)."""
        if scoring not in SCORINGS:
            raise ConfigError(f"scoring={scoring}: unknown scoring (allowed: {', '.join(SCORINGS)})")
        if truncation not in TRUNCATIONS:
            raise ConfigError(f"truncation={truncation}: unknown truncation (allowed: {', '.join(TRUNCATIONS)})")
        super().__init__(pretrained=handle.model, tokenizer=handle.tokenizer, batch_size=batch_size,
                         max_length=max_length, device=str(handle.device))
        self.handle = handle
        self.scoring = scoring
        self.truncation_mode = truncation
        self.max_input_tokens = max_input_tokens
        self.chat_template = chat_template
        # prompt as sent -> (tokens before truncation, tokens after), without the chat template
        self.input_lengths: dict[str, tuple[int, int]] = {}
        self._generation_progress = None

    # ------------------------------------------------------------------ generation
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        mask = generation_kwargs.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones_like(context)
        cache = self.handle.new_cache(mask)
        out = super()._model_generate(context, max_length, stop, attention_mask=mask,
                                      **{cache_kwarg(self.model): cache}, **generation_kwargs)
        s = self.handle.stats
        s.prompt_tokens += int(mask.sum())
        s.generated_tokens += int((out[:, context.shape[1]:] != self.tokenizer.pad_token_id).sum())
        s.observe_cache(cache, self.handle.method)
        if self._generation_progress is not None:
            self._generation_progress.update(context.shape[0])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Middle truncation and the chat template act on the prompt text, before lm-eval
        tokenizes it; lm-eval's left truncation is then a no-op for truncated prompts."""
        for req in requests:
            context, gen_kwargs = req.args
            text, lengths = self._fit(context, gen_kwargs)
            if self.chat_template is not None and self.tokenizer.chat_template \
                    and self.chat_template(req.task_name):
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                          tokenize=False, add_generation_prompt=True)
            self.input_lengths[text] = lengths
            req.arguments = (text, gen_kwargs)  # lm-eval logs the prompt as sent
        # lm-eval's own bar is a terminal's; a log gets qeval's steady progress lines instead
        self._generation_progress = self.handle.progress_bar(len(requests), "generate_until", "request")
        try:
            return super().generate_until(requests, disable_tqdm=disable_tqdm or self._generation_progress.bar is None)
        finally:
            self._generation_progress.close()
            self._generation_progress = None

    def _fit(self, context: str, gen_kwargs: dict) -> tuple[str, tuple[int, int]]:
        """LongBench's truncation: if the prompt has more than ``budget`` tokens keep the first
        and last ``budget / 2`` (the instruction and the question sit at the two ends)."""
        toks = self.tok_encode(context)
        budget = self.max_input_tokens or (self.max_length - gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        text = context
        if self.truncation_mode == "middle" and len(toks) > budget:
            half = budget // 2
            text = self.tok_decode(toks[:half], skip_special_tokens=True) + \
                self.tok_decode(toks[len(toks) - (budget - half):], skip_special_tokens=True)
        return text, (len(toks), len(self.tok_encode(text)) if text is not context else len(toks))

    # ------------------------------------------------------------------ log-likelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.scoring == "stock":
            self.handle.stats.prompt_tokens += sum(min(len(c) + len(t), self.max_length) for _, c, t in requests)
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        groups = self._by_prefix(requests)
        bs = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else 1
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = self.handle.progress_bar(len(requests), "loglikelihood (prefill + continuation)")
        for start in range(0, len(groups), bs):
            idx = [i for group in groups[start:start + bs] for i in group]
            for i, answer in zip(idx, self._score_batch([requests[i] for i in idx])):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(idx))
        bar.close()
        return results

    def _prefix(self, request) -> tuple[int, ...]:
        """The tokens a request prefills: (context + continuation) truncated as lm-eval does,
        minus the continuation and the context's last token (see :meth:`_score_batch`)."""
        _, ctx, cont = request
        return tuple((ctx + cont)[-(self.max_length + 1):][:-(len(cont) + 1)])

    def _by_prefix(self, requests) -> list[list[int]]:
        """Request indices grouped by the prefix they prefill (a multiple-choice question's
        choices share one), longest first; a batch takes ``batch_size`` groups, so each distinct
        prefix is prefilled once and its cache expanded to its continuations."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._prefix(r), []).append(i)
        return sorted(groups.values(), key=lambda g: -max(len(requests[i][1]) + len(requests[i][2]) for i in g))

    @torch.no_grad()
    def _score_batch(self, batch) -> list[tuple[float, bool]]:
        """Prefill ``prefix`` into a fresh method cache, then score ``tail`` through it.

        For tokens ``x = (ctx + cont)[-(max_length + 1):]`` (lm-eval's left truncation):
        prefix = x[:-(n + 1)], tail = x[-(n + 1):-1], targets = cont (n tokens), so position j
        of the tail predicts cont[j]. Prefixes are left-padded, tails right-padded.
        """
        dev, pad_id = self.device, self.tokenizer.pad_token_id or 0
        prefixes, tails, targets = [], [], []
        for _, ctx, cont in batch:
            x = (ctx + cont)[-(self.max_length + 1):]
            n = len(cont)
            prefixes.append(x[:-(n + 1)])
            tails.append(x[-(n + 1):-1])
            targets.append(cont)
        B, Lp, Lt = len(batch), max(map(len, prefixes)), max(map(len, tails))
        ids_p = torch.full((B, Lp), pad_id, dtype=torch.long, device=dev)
        mask_p = torch.zeros((B, Lp), dtype=torch.long, device=dev)
        ids_t = torch.full((B, Lt), pad_id, dtype=torch.long, device=dev)
        mask_t = torch.zeros((B, Lt), dtype=torch.long, device=dev)
        for b, (p, t) in enumerate(zip(prefixes, tails)):
            if p:
                ids_p[b, Lp - len(p):] = torch.tensor(p, device=dev)  # left padding
                mask_p[b, Lp - len(p):] = 1
            ids_t[b, :len(t)] = torch.tensor(t, device=dev)           # right padding
            mask_t[b, :len(t)] = 1
        mask = torch.cat([mask_p, mask_t], dim=1)  # (B, Lp + Lt): the cache excludes both paddings
        # each distinct prefix is prefilled once (row ``first[u]``), then the cache is expanded so
        # that row b holds the prefix of ``source[b]``: the operation beam search does, which every
        # qeval cache supports; identical prefixes have identical left padding, so the expanded
        # rows are exactly what prefilling each row would have stored
        first = {}
        source = [first.setdefault(tuple(p), len(first)) for p in prefixes]
        rows = torch.tensor([source.index(u) for u in range(len(first))], device=dev)
        cache = self.handle.new_cache(mask_p[rows] if Lp else mask)
        if Lp:
            pos_p = (mask_p[rows].cumsum(-1) - 1).clamp(min=0)
            self.model(input_ids=ids_p[rows], attention_mask=mask_p[rows], position_ids=pos_p,
                       **{cache_kwarg(self.model): cache}, use_cache=True)
            cache.reorder_cache(torch.tensor(source, device=dev))
            if hasattr(cache, "seq"):   # a qeval cache: its padding facts now cover every row
                cache.seq.attention_mask = mask
        pos_t = mask_p.sum(-1, keepdim=True) + torch.arange(Lt, device=dev)[None]
        logits = self.model(input_ids=ids_t, attention_mask=mask, position_ids=pos_t,
                            **{cache_kwarg(self.model): cache}, use_cache=True).logits  # (B, Lt, V)
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        s = self.handle.stats
        s.prompt_tokens += int(mask_p[rows].sum() + mask_t.sum()) if Lp else int(mask.sum())
        s.observe_cache(cache, self.handle.method)
        answers = []
        for b, cont in enumerate(targets):
            lp = logprobs[b, :len(cont)]                         # (n, V)
            want = torch.tensor(cont, device=dev)
            greedy = bool((lp.argmax(-1) == want).all())
            answers.append((float(lp.gather(-1, want[:, None]).sum()), greedy))
        return answers
