"""Tasks: each evaluates a :class:`qeval.model.handle.Handle` with its config node and returns
metric rows, and checks its own keys before any model loads. ``TASKS`` and ``CHECKS`` are the
tables the runner and validation read: key = config file name (``qeval/configs/task/<name>.yaml``)."""

from collections.abc import Callable

from qeval.tasks import passkey, perplexity, quant_error, toy_arith, toy_mc
from qeval.tasks.lm_eval import tasks as lm_eval_tasks

TASKS: dict[str, Callable] = {
    "passkey": passkey.evaluate,
    "toy_arith": toy_arith.evaluate,
    "toy_mc": toy_mc.evaluate,
    "quant_error": quant_error.evaluate,
    **{name: perplexity.task(name) for name in perplexity.TASKS},
    **{name: lm_eval_tasks.task(name) for name in lm_eval_tasks.LM_EVAL_TASKS},
}
# check(name, node, ModelFacts): each task's keys, before any weights load
CHECKS: dict[str, Callable] = {
    "passkey": passkey.check,
    "toy_arith": toy_arith.check,
    "toy_mc": toy_mc.check,
    "quant_error": quant_error.check,
    **{name: perplexity.check for name in perplexity.TASKS},
    **{name: lm_eval_tasks.check for name in lm_eval_tasks.LM_EVAL_TASKS},
}
