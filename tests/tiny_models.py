"""Tiny randomly initialised models of several families, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qeval.model.loading import char_tokenizer

# family -> config overrides; every one small enough to run a forward in milliseconds
FAMILIES = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=64),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
                   num_kv_heads=2),
}
# families whose attention code ignores transformers' AttentionInterface (transformers 5.x)
OWN_ATTENTION = {
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
}


def tiny_model(family: str = "llama", attn: str | None = None, seed: int = 0, dtype=torch.float32):
    tok = char_tokenizer()
    attn = attn or ("eager" if family in OWN_ATTENTION else "sdpa")   # BLOOM has no sdpa path
    cfg = AutoConfig.for_model(family, vocab_size=len(tok), max_position_embeddings=512,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **(FAMILIES | OWN_ATTENTION)[family])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn).eval()
    return model, tok


def runs_registered_attention(model) -> bool:
    """Ground truth, independent of qeval: a real forward of ``model`` under a counting attention
    function (restores the model's own implementation afterwards)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("tests_counting", counting)
    AttentionMaskInterface.register("tests_counting", sdpa_mask)
    own = model.config._attn_implementation
    model.set_attn_implementation("tests_counting")
    try:
        with torch.no_grad():
            model(input_ids=torch.ones(1, 3, dtype=torch.long))
    finally:
        model.set_attn_implementation(own)
    return bool(calls)
