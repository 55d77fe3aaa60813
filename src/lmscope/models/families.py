"""The family table: for each architecture, where its parts live (canonical name -> HF module path).

Adding a family is one entry in ``FAMILIES``. Paths are relative to the model object that
``lmscope.load`` returns (``*ForCausalLM`` for decoders, the bare ``*Model`` for encoders); block-level
paths are relative to one block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import LmscopeError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    causal: bool
    embed: str  # token embedding (nn.Embedding)
    blocks: str  # nn.ModuleList of transformer blocks
    attn: str  # the module that calls the attention function (holds layer_idx / config)
    q: str
    k: str
    v: str
    o: str  # attention output projection: its input is the per-head output
    mlp_in: tuple[str, ...]  # gate/up (gated) or fc (plain)
    mlp_out: str  # its input is the post-activation hidden layer
    ln_attn: str  # norm before (pre-LN) or after (post-LN) attention
    ln_mlp: str
    final_norm: str | None  # applied before the unembedding (logit lens)
    unembed: str | None  # lm head
    pos_embed: str | None = None
    fused_qkv: bool = False  # q, k, v live in one projection (GPT-2 c_attn)
    conv1d: bool = False  # weights stored [in, out] (GPT-2 Conv1D)
    post_ln: bool = False  # norms after the residual add (BERT)


_LLAMA = dict(
    causal=True,
    embed="model.embed_tokens",
    blocks="model.layers",
    attn="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    ln_attn="input_layernorm",
    ln_mlp="post_attention_layernorm",
    final_norm="model.norm",
    unembed="lm_head",
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(name="llama", model_types=("llama", "qwen2", "mistral", "smollm3"), **_LLAMA),
        Family(
            name="gpt2",
            model_types=("gpt2",),
            causal=True,
            embed="transformer.wte",
            pos_embed="transformer.wpe",
            blocks="transformer.h",
            attn="attn",
            q="attn.c_attn",
            k="attn.c_attn",
            v="attn.c_attn",
            o="attn.c_proj",
            mlp_in=("mlp.c_fc",),
            mlp_out="mlp.c_proj",
            ln_attn="ln_1",
            ln_mlp="ln_2",
            final_norm="transformer.ln_f",
            unembed="lm_head",
            fused_qkv=True,
            conv1d=True,
        ),
        Family(
            name="bert",
            model_types=("bert", "roberta", "xlm-roberta"),
            causal=False,
            embed="embeddings.word_embeddings",
            pos_embed="embeddings.position_embeddings",
            blocks="encoder.layer",
            attn="attention.self",
            q="attention.self.query",
            k="attention.self.key",
            v="attention.self.value",
            o="attention.output.dense",
            mlp_in=("intermediate.dense",),
            mlp_out="output.dense",
            ln_attn="attention.output.LayerNorm",
            ln_mlp="output.LayerNorm",
            final_norm=None,
            unembed=None,
            post_ln=True,
        ),
    ]
}


def family_for(model_type: str) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise LmscopeError(
        f"model type '{model_type}' is not supported",
        f"use one of: {known} (or add a Family entry in lmscope/models/families.py)",
    )


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)
