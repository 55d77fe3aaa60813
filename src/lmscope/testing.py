"""Tiny random models of every supported family, built from config objects (no downloads).

Used by the test suite and ``benchmarks/families.py``. Weights are scaled up after the random init so attention
is sharp rather than uniform (a uniform pattern would hide a wrong mask), and sliding windows are shorter than
the test texts so the window code path really runs.
"""

from __future__ import annotations

import torch

DECODERS = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi",
    "phi3",
    "gpt2",
    "gpt_neox",
    "gptj",
    "gpt_bigcode",
    "codegen",
    "opt",
    "bloom",
    "falcon",
    "mpt",
    "stablelm",
    "starcoder2",
    "olmo",
    "olmo2",
    "granite",
    "cohere",
    "smollm3",
)
ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "deberta-v2")
FAMILIES = DECODERS + ENCODERS

CAUSAL_VOCAB = 49152  # smollm2's tokenizer
ENCODER_VOCAB = 30522  # minilm's tokenizer
WINDOW = 6  # sliding window shorter than the test texts

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

#: per-family overrides on top of _COMMON (names as each config class spells them)
_OVERRIDES: dict[str, dict] = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=WINDOW),
    "mixtral": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    "qwen2": dict(num_key_value_heads=2),
    "qwen2_moe": dict(
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=64,
    ),
    "qwen3": dict(num_key_value_heads=2, head_dim=16),
    "qwen3_moe": dict(
        num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48
    ),
    "gemma": dict(num_key_value_heads=1, head_dim=16),
    "gemma2": dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW),
    "gemma3_text": dict(
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi": dict(partial_rotary_factor=0.5),
    "phi3": dict(num_key_value_heads=2),
    "gpt2": dict(n_inner=96),
    "gptj": dict(rotary_dim=8, n_inner=96),
    "gpt_bigcode": dict(n_inner=96, multi_query=True),
    "codegen": dict(rotary_dim=8, n_inner=96, n_ctx=128),
    "opt": dict(ffn_dim=96, word_embed_proj_dim=64),
    "falcon": dict(
        num_kv_heads=4, new_decoder_architecture=False, multi_query=False, parallel_attn=True, alibi=False
    ),
    "mpt": dict(expansion_ratio=2, max_seq_len=128),
    "stablelm": dict(num_key_value_heads=2),
    "starcoder2": dict(num_key_value_heads=2, sliding_window=WINDOW),
    "olmo": dict(num_key_value_heads=2),
    "olmo2": dict(num_key_value_heads=2),
    "granite": dict(
        num_key_value_heads=2,
        logits_scaling=2.0,
        attention_multiplier=0.2,
        residual_multiplier=0.5,
        embedding_multiplier=3.0,
    ),
    "cohere": dict(num_key_value_heads=2, logit_scale=0.5),
    "smollm3": dict(num_key_value_heads=2),
    "distilbert": dict(hidden_dim=96),
    "electra": dict(embedding_size=32),
    "albert": dict(embedding_size=32, num_hidden_groups=1, inner_group_num=1),
    "deberta-v2": dict(
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        max_relative_positions=16,
        position_buckets=8,
        type_vocab_size=0,
    ),
}


def tiny_config(model_type: str, **extra):
    """A tiny config of ``model_type`` (a transformers model_type, e.g. ``"gpt_neox"``)."""
    from transformers import AutoConfig

    encoder = model_type in ENCODERS
    kw = dict(_COMMON, vocab_size=ENCODER_VOCAB if encoder else CAUSAL_VOCAB)
    kw.update(_OVERRIDES.get(model_type, {}))
    kw.update(extra)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, head: str | None = None, seed: int = 0, scale: float = 4.0, **extra):
    """A random tiny model: ``head`` is ``"lm"`` (default for decoders), ``"base"`` (default for encoders),
    ``"seq"`` (sequence classification, 3 labels) or ``"tok"`` (token classification, 3 labels)."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    from .models.loading import attn_implementation_for

    head = head or ("base" if model_type in ENCODERS else "lm")
    if head in ("seq", "tok"):
        extra.setdefault("num_labels", 3)
        extra.setdefault("id2label", {0: "negative", 1: "neutral", 2: "positive"})
        extra.setdefault("label2id", {"negative": 0, "neutral": 1, "positive": 2})
    cfg = tiny_config(model_type, **extra)
    cls = {
        "lm": AutoModelForCausalLM,
        "base": AutoModel,
        "seq": AutoModelForSequenceClassification,
        "tok": AutoModelForTokenClassification,
    }[head]
    torch.manual_seed(seed)
    impl = attn_implementation_for(cls._model_mapping[type(cfg)])
    model = cls.from_config(cfg, attn_implementation=impl)
    with torch.no_grad():  # random init leaves near-uniform attention: sharpen it
        for mod in model.modules():
            if isinstance(mod, torch.nn.Embedding):
                continue
            for p in mod.parameters(recurse=False):
                if p.dim() >= 2:
                    p.mul_(scale)
        from .models.families import family_of

        fam = family_of(model)
        blocks = model.get_submodule(fam.blocks)
        for block in blocks:  # queries and keys 3x larger: scores 9x, patterns far from uniform
            for path in {fam.q, fam.k}:
                block.get_submodule(path).weight.mul_(3.0)
    return model.eval()
