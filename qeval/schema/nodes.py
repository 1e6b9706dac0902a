"""Every config node's keys and their types: the top level, ``model``, ``calibration``, one node
per method and one per task. A key not listed is unknown; a listed key without ``Optional`` is
required. Ranges that depend on the model (a group size that divides head_dim, lengths within its
positions) or on other keys are checked later, before any weights load (:mod:`qeval.validate`, each
method's ``check``, each task's ``check``); the types here are what those checks can rely on.

The lists of choices repeat constants of modules that import torch (this module must not);
``tests/test_schema.py`` holds them equal, and holds every YAML option's keys and defaults to its
node here.
"""

from __future__ import annotations

from qeval.schema.groups import options
from qeval.schema.types import (
    AnyOf,
    ArchConfig,
    Bool,
    Choice,
    Int,
    Label,
    ListOf,
    Nullable,
    Number,
    Optional,
    Pattern,
    Str,
)

BITS = Int()          # each method says which bits it supports (validate.check_config)
GROUP_SIZE = Nullable(Int(1))
ZERO_POINT = Choice(("real", "integer", "gptq"))
# torch.manual_seed takes 64 bits, numpy's legacy seeding only 32: the range every seed reaches
SEED = Int(0, 2**32 - 1)
DEVICE = Pattern(r"auto|cpu|cuda|cuda:\d{1,3}", "auto, cpu, cuda, cuda:N")
DTYPE = Choice(("auto", "float32", "float16", "bfloat16"))
ATTN = Choice(("sdpa", "eager"))
PATH = Str("a path")
TEXT = Str()

MODEL = {
    "name": Label("a model name"),
    "path": Nullable(Str("a hub id (org/name) or a local model directory")),
    "revision": Nullable(Str("a hub revision (branch, tag or commit)")),
    # a model folder's own Python code runs only with exactly true (transformers' auto_map)
    "trust_remote_code": Bool(),
    # an architecture built from its config with random weights (model=tiny-random)
    "random_config": Optional(Nullable(ArchConfig())),
}

CALIBRATION = {
    "name": Label("a calibration name"),
    "dataset": Nullable(Str("a hub dataset id")),
    "dataset_name": Nullable(TEXT),
    "data_files": Nullable(AnyOf((TEXT, ListOf(TEXT)))),
    "split": Nullable(TEXT),
    "sampling": Nullable(Choice(("random_windows", "documents", "concatenated_blocks", "joined_windows",
                                 "toy_documents"))),
    "n_samples": Nullable(Int()),
    "seq_len": Nullable(Int()),
    "seed": Nullable(SEED),
    "data_dir": Nullable(PATH),
}


def calibration_preset() -> Choice:
    """A method's ``calibration`` names a file of the calibration group, nothing else."""
    return Choice(tuple(o for o in options("calibration") if o != "auto"))


FRACTION = Number(0, 1)   # a share of a prompt, of entries, a damping or migration strength


def methods() -> dict[str, dict]:
    """Each method's node (``qeval/configs/method/<name>.yaml``); ``name`` must be the method's."""
    scales_file = Nullable(Str("a scales file (.pt)"))
    rtn = {"symmetric": Bool(), "zero_point": ZERO_POINT}
    return {
        "uniform": rtn | {"w_granularity": Choice(("per_tensor", "per_channel")),
                          "a_granularity": Choice(("per_tensor", "per_token")),
                          "kv_granularity": Choice(("per_tensor", "per_token", "per_channel"))},
        "group": dict(rtn),
        # ranges live here; what relates two keys (or excludes a bound) is the method's check
        "kivi": {"group_size": Int(1), "residual_length": Int(1)},
        "gear": {"backbone": Choice(("kivi", "uniform")), "group_size": Int(1), "outlier_ratio": FRACTION,
                 "outlier_rule": Choice(("paper", "reference_code")), "rank_prefill": Int(0),
                 "rank_decode": Int(0), "rank_ratio": Nullable(FRACTION), "power_iterations": Int(1),
                 "stream_block": Int(1)},
        "gptq": {"damp": FRACTION, "block_size": Int(1), "act_order": Bool(), "static_groups": Bool(),
                 "sym": Bool(), "true_sequential": Bool(), "calibration": calibration_preset()},
        "awq": {"zero_point": ZERO_POINT, "n_grid": Int(1), "max_shrink": FRACTION, "auto_scale": Bool(),
                "auto_clip": Bool(), "calibration": calibration_preset(), "scales_file": scales_file},
        "smoothquant": rtn | {"alpha": FRACTION, "calibration": calibration_preset(), "scales_file": scales_file},
        "h2o": {"heavy_ratio": FRACTION, "recent_ratio": FRACTION, "heavy_budget": Nullable(Int(0)),
                "recent_budget": Nullable(Int(0))},
        "streaming": {"n_sink": Int(0), "recent_ratio": FRACTION, "recent_budget": Nullable(Int(0))},
    }


def tasks() -> dict[str, dict]:
    """Each task's node (``qeval/configs/task/<name>.yaml``). Ranges are the task's own check's."""
    lm_eval = {
        "lm_eval_tasks": ListOf(TEXT), "lm_eval_dirs": Nullable(ListOf(TEXT)),
        "num_fewshot": Nullable(Int()), "limit": Nullable(Number()), "max_gen_toks": Nullable(Int()),
        "batch_size": Int(), "scoring": Choice(("prefill", "stock")), "data_dir": Nullable(PATH),
        "max_length": Nullable(Int()), "bootstrap_iters": Int(0),
        # one seed for all four of lm-eval's, or four (null leaves that one unset)
        "seed": AnyOf((Int(), ListOf(Nullable(Int())))),
    }
    longbench = lm_eval | {"truncation": Choice(("middle", "left")), "max_input_tokens": Nullable(Int()),
                           "chat_template": Bool(), "no_chat_tasks": ListOf(TEXT, non_empty=False),
                           "task_mean_metric": TEXT}
    perplexity = {
        "protocol": Choice(("gptq_wikitext2", "gptq_c4_new", "gptq_c4")), "dataset_path": TEXT,
        "dataset_name": Nullable(TEXT), "data_files": Nullable(AnyOf((TEXT, ListOf(TEXT)))), "split": TEXT,
        "seqlen": Int(), "windows": Nullable(Int()), "batch_size": Int(),
        "scoring": Choice(("auto", "one_pass", "through_cache")), "prefill_tokens": Int(), "chunk": Int(),
        "corpus": Choice(("auto", "dataset", "toy")), "seed": Optional(Int()), "toy_seed": Int(),
        "data_dir": Nullable(PATH), "model_path": Nullable(TEXT),
    }
    toy = {"n_samples": Int(), "batch_size": Int(), "seed": Int()}
    return {
        "passkey": {"lengths": ListOf(Int()), "depths": ListOf(Number()), "samples_per_cell": Int(),
                    "key_digits": Int(), "batch_size": Int(), "seed": Int()},
        "toy_arith": toy | {"max_new_tokens": Int()},
        "toy_mc": toy,
        "quant_error": {"text": Nullable(TEXT), "n_tokens": Int(), "context_tokens": Int(), "model": MODEL,
                        "device": DEVICE, "dtype": DTYPE, "attn": ATTN, "seed": SEED},
        **{name: dict(lm_eval) for name in ("bbh", "gsm8k", "gsm8k_cot", "mmlu", "wikitext")},
        "longbench": longbench,
        "c4": perplexity, "wikitext2": perplexity,
    }


TOP = {
    "w_bits": BITS, "a_bits": BITS, "kv_bits": BITS, "k_bits": Nullable(BITS), "v_bits": Nullable(BITS),
    # formats are checked against the method with a did-you-mean (validate.check_formats)
    "w_format": TEXT, "a_format": TEXT, "kv_format": TEXT,
    "kv_scale": Choice(("dynamic", "static", "static_per_head")),
    "w_group_size": GROUP_SIZE, "a_group_size": GROUP_SIZE, "kv_group_size": GROUP_SIZE,
    "w_keep_layers": ListOf(Int(), non_empty=False), "kv_keep_layers": ListOf(Int(), non_empty=False),
    "kv_semantics": Choice(("cache", "simulated")),
    "device": DEVICE, "dtype": DTYPE, "attn": ATTN, "backend": Choice(("auto", "torch", "triton")),
    "seed": SEED, "results_dir": PATH, "force": Bool(), "resume": Choice(("skip", "strict")),
}
