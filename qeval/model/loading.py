"""Model loading: hub id | local directory | tiny random config -> (model, tokenizer).

Every path ends in the same Auto classes, so an embedded or random model exercises the code a
hub model runs through.
"""

from __future__ import annotations

import os
import string
from functools import cached_property

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from qeval.kernels import _env

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# ``path: "@name"`` names a model shipped inside the package (qeval/assets/<name>, e.g. the toy model)
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def resolve_path(path: str) -> str:
    """A packaged model's directory for ``@name``; any other path or hub id unchanged."""
    return os.path.join(ASSETS, path[1:]) if isinstance(path, str) and path.startswith("@") else path


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, built in memory (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", padding_side="left")


def resolve_device(device: str) -> torch.device:
    _env.confirm_with_torch()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def trusts_remote_code(model_cfg) -> bool:
    """A model folder's own Python code (transformers' ``auto_map``) runs only for exactly ``true``:
    the schema refuses anything else, and a string such as ``"false"`` must never count as truthy."""
    return model_cfg.get("trust_remote_code", False) is True


def model_config(model_cfg, vocab_size: int | None = None):
    """The architecture config, without weights: what validation reads before anything loads."""
    if model_cfg.get("random_config"):
        # plain containers all the way down: transformers checks nested fields (rope_parameters) as dicts
        rc = model_cfg.random_config
        kw = OmegaConf.to_container(rc, resolve=True) if isinstance(rc, DictConfig) else dict(rc)
        model_type = kw.pop("model_type")
        kw.setdefault("vocab_size", vocab_size or len(char_tokenizer()))
        return AutoConfig.for_model(model_type, **kw)
    return AutoConfig.from_pretrained(resolve_path(model_cfg.path), revision=model_cfg.get("revision"),
                                      trust_remote_code=trusts_remote_code(model_cfg))


def load_tokenizer(model_cfg):
    """The model's tokenizer, left-padding, with a pad token (no weights are read)."""
    if model_cfg.get("random_config"):
        tokenizer = char_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_path(model_cfg.path), revision=model_cfg.get("revision"),
            trust_remote_code=trusts_remote_code(model_cfg))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class ModelFacts:
    """What validation may read about a model before its weights load: the architecture config,
    and the tokenizer, loaded on first use (only checks that need it pay for it)."""

    def __init__(self, arch, model_cfg) -> None:
        self.arch, self.model_cfg = arch, model_cfg

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.model_cfg)


def load(model_cfg, device: str = "auto", dtype: str = "auto", attn: str = "sdpa", seed: int = 0):
    """Load (model, tokenizer) in eval mode; a multi-GPU node spreads a large model with
    ``device_map=auto``."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer = load_tokenizer(model_cfg)
    if model_cfg.get("random_config"):
        config = model_config(model_cfg, len(tokenizer))
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dt, attn_implementation=attn).to(dev)
    else:
        kw = dict(revision=model_cfg.get("revision"), trust_remote_code=trusts_remote_code(model_cfg))
        many_gpus = dev.type == "cuda" and torch.cuda.device_count() > 1 and device == "auto"
        model = AutoModelForCausalLM.from_pretrained(
            resolve_path(model_cfg.path), dtype=dt, attn_implementation=attn,
            device_map="auto" if many_gpus else {"": dev}, **kw)
    model.eval()
    return model, tokenizer


def is_available_offline(path: str) -> bool:
    """A local directory, or a hub id whose config is already in the Hugging Face cache."""
    path = resolve_path(path)
    if os.path.isdir(path):
        return True
    from huggingface_hub import try_to_load_from_cache
    hit = try_to_load_from_cache(path, "config.json")
    return isinstance(hit, str)
