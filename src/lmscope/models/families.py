"""Where a model's parts live: canonical name -> module path, derived from the module tree and config.

``family_of(model)`` reads the block list, the module that computes attention, q/k/v/o, the MLP's input and
output projections, the MoE router, norms, embeddings and unembedding from the model itself, by the names
transformers' families use for each role. What cannot be read off the tree (the layout of a fused qkv
projection, whether a norm can absorb SmoothQuant scales) sits in small tables below, and families that
lmscope cannot open correctly are refused by name with the reason. Paths are relative to the model object
``lmscope.load`` returns; block-level paths are relative to one block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import LmscopeError


@dataclass(frozen=True)
class Family:
    name: str  # the transformers model_type
    causal: bool
    embed: str  # token embedding (nn.Embedding)
    blocks: str  # nn.ModuleList of transformer blocks
    attn: str  # the module that computes attention (holds q/k/v)
    q: str
    k: str
    v: str
    o: str  # attention output projection: its input is the per-head output
    mlp_in: tuple[str, ...]  # gate/up (gated) or fc (plain); empty for a mixture of experts
    mlp_out: str | None  # its input is the post-activation hidden layer; None for a mixture of experts
    ln_attn: str | None  # the norm feeding q/k/v, when SmoothQuant may fold scales into it
    ln_mlp: str | None  # the norm feeding mlp_in, likewise
    final_norm: str | None  # applied before the unembedding (logit lens)
    unembed: str | None  # lm head
    pos_embed: str | None = None
    fused_qkv: bool = False  # q, k, v live in one projection (q == k == v == that path)
    qkv_layout: str | None = None  # fused only: "concat" ([q | k | v]) or "per_head" ([h0: q k v, h1: ...])
    conv1d: bool = False  # weights stored [in, out] (GPT-2 Conv1D)
    post_ln: bool = False  # norms after the residual add (BERT)
    native_attention: bool = False  # attention in the family's own code: patterns via output_attentions
    mlp: str | None = None  # the whole MLP / MoE block (its output is mlp.out for a mixture of experts)
    router: str | None = None  # MoE router (emits logits, top-k weights, top-k experts)
    experts: str | None = None  # MoE experts (3-D gate_up_proj / down_proj parameters)
    gated_mlp: bool = False  # act(gate) * up -> down: up's rows may absorb down's input scales
    mid: str | None = None  # the module whose input is resid_mid (None: attention and MLP run in parallel)
    shared: bool = False  # one block module runs at every depth (ALBERT): LM.blocks repeats it

    @property
    def moe(self) -> bool:
        return self.router is not None


# -- role names, in order of preference ------------------------------------------------------------------
_Q = ("q_proj", "query", "q_lin", "query_proj")
_K = ("k_proj", "key", "k_lin", "key_proj")
_V = ("v_proj", "value", "v_lin", "value_proj")
_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv")
_O = ("o_proj", "out_proj", "dense", "c_proj", "out_lin")
_MLP = ("mlp", "ffn", "feed_forward", "intermediate")
_MLP_IN = (
    ("gate_proj", "up_proj"),
    ("gate_up_proj",),
    ("c_fc",),
    ("fc1",),
    ("fc_in",),
    ("dense_h_to_4h",),
    ("lin1",),
    ("up_proj",),
    ("dense",),
)
_MLP_OUT = ("down_proj", "c_proj", "fc2", "fc_out", "dense_4h_to_h", "lin2")
_FINAL_NORM = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
_POS = ("wpe", "position_embeddings", "embed_positions")

#: fused qkv layouts (not visible in the tree): "concat" = [q | k | v]; "per_head" = per head [q k v]
_QKV_LAYOUT = {
    "gpt2": "concat",
    "gpt_bigcode": "concat",
    "phi3": "concat",
    "mpt": "concat",
    "gpt_neox": "per_head",
    "bloom": "per_head",
    "falcon": "falcon",  # depends on new_decoder_architecture / multi_query: head surgery refused
    "codegen": "codegen",  # split into mp_num=4 interleaved shards: head surgery refused
}

#: families whose norms SmoothQuant may fold scales into (plain RMSNorm/LayerNorm feeding q/k/v and the gated
#: MLP; Gemma's (1 + w) norms, parallel blocks and post-norms must not be folded)
_SMOOTH_FOLDS = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo"}

#: encoder-decoder and other architectures lmscope refuses, with the reason
_REFUSED = {
    "t5": "an encoder-decoder (T5)",
    "mt5": "an encoder-decoder (mT5)",
    "bart": "an encoder-decoder (BART)",
    "mbart": "an encoder-decoder (mBART)",
    "pegasus": "an encoder-decoder (Pegasus)",
    "marian": "an encoder-decoder (Marian)",
    "whisper": "a speech encoder-decoder (Whisper)",
}


def num_layers(config) -> int:
    for attr in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        n = getattr(config, attr, None)
        if isinstance(n, int):
            return n
    raise LmscopeError("the config names no layer count", "pass a transformers decoder or encoder model")


def check_supported(config) -> None:
    """Refuse, before any weight is read, what lmscope cannot open correctly."""
    mt = getattr(config, "model_type", "?")
    if mt in _REFUSED or getattr(config, "is_encoder_decoder", False):
        why = _REFUSED.get(mt, f"an encoder-decoder ({mt})")
        raise LmscopeError(
            f"model type '{mt}' is {why}, which lmscope does not support yet",
            "use a decoder-only (Llama, GPT-2, Qwen, Gemma, ...) or encoder-only (BERT, RoBERTa, DeBERTa, ...) model",
        )


def _child(module: nn.Module, names) -> str | None:
    kids = dict(module.named_children())
    for n in names:
        if n in kids:
            return n
    return None


def _linear_like(m: nn.Module) -> bool:
    return hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2


def _find_shared_blocks(model: nn.Module, config) -> str | None:
    """ALBERT: one group of layers re-run at every depth. Supported when there is one group of one layer
    (every released ALBERT); the path of that one-layer list."""
    if getattr(config, "num_hidden_groups", None) is None:
        return None
    if config.num_hidden_groups != 1 or getattr(config, "inner_group_num", 1) != 1:
        raise LmscopeError(
            f"this ALBERT shares {config.num_hidden_groups} groups of {config.inner_group_num} layers; lmscope "
            "supports one shared layer (num_hidden_groups = inner_group_num = 1, as in every released ALBERT)",
            "use an ALBERT with one shared layer",
        )
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == 1 and name.endswith("albert_layers"):
            return name
    return None


def _find_blocks(model: nn.Module, n: int) -> str:
    found = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n and name and len(mod) > 0
    ]
    # the block list holds modules that themselves hold an attention; prefer the shallowest
    found = [f for f in found if any(_child(m, _Q + _QKV) for m in model.get_submodule(f)[0].modules())]
    if not found:
        raise LmscopeError(
            f"cannot find the list of {n} transformer blocks in {type(model).__name__}",
            "this architecture is not supported; open an issue with its model_type",
        )
    return min(found, key=lambda s: s.count("."))


def _find_attn(block: nn.Module) -> tuple[str, str | None, str | None, str | None, str | None]:
    """(attn path, q, k, v, fused qkv) relative to the block."""
    for path, mod in block.named_modules():
        if not path:
            continue
        q, k, v = _child(mod, _Q), _child(mod, _K), _child(mod, _V)
        if q and k and v:
            return path, f"{path}.{q}", f"{path}.{k}", f"{path}.{v}", None
        fused = _child(mod, _QKV)
        if fused:
            return path, None, None, None, f"{path}.{fused}"
    raise LmscopeError("cannot find the attention projections (q/k/v)", "this architecture is not supported")


def _find_o(block: nn.Module, attn: str) -> str:
    mod = block.get_submodule(attn)
    o = _child(mod, _O)
    if o:
        return f"{attn}.{o}"
    parent = attn.rsplit(".", 1)[0] if "." in attn else ""
    for cand in ("output.dense",):  # BERT-style: attention.self + attention.output.dense
        path = f"{parent}.{cand}" if parent else cand
        try:
            block.get_submodule(path)
            return path
        except AttributeError:
            pass
    raise LmscopeError("cannot find the attention output projection", "this architecture is not supported")


def _find_mlp(block: nn.Module, attn: str):
    """(mlp module path, mlp_in, mlp_out, router, experts)."""
    attn_root = attn.split(".")[0]
    if _child(block, ("ffn",)) and _child(block, ("ffn_output",)):  # ALBERT: two Linears in the layer
        return None, ("ffn",), "ffn_output", None, None
    mlp_name = _child(block, _MLP)
    if mlp_name:
        mlp = block.get_submodule(mlp_name)
        if hasattr(mlp, "experts") and hasattr(mlp, "gate"):
            return mlp_name, (), None, f"{mlp_name}.gate", f"{mlp_name}.experts"
        for names in _MLP_IN:
            if all(_child(mlp, (n,)) for n in names):
                ins = tuple(f"{mlp_name}.{n}" for n in names)
                out = _child(mlp, _MLP_OUT)
                if out:
                    return mlp_name, ins, f"{mlp_name}.{out}", None, None
                break
        if mlp_name == "intermediate":  # BERT-style: intermediate.dense -> output.dense
            if _child(block, ("output",)) and _child(block.get_submodule("output"), ("dense",)):
                return None, ("intermediate.dense",), "output.dense", None, None
    # MLP projections straight in the block (OPT: fc1 / fc2)
    for names in _MLP_IN:
        if all(_child(block, (n,)) for n in names) and names[0] != attn_root:
            out = _child(block, _MLP_OUT)
            if out:
                return None, tuple(names), out, None, None
    raise LmscopeError("cannot find the MLP projections", "this architecture is not supported")


def _find_final_norm(model: nn.Module, blocks: str) -> str | None:
    owner = blocks.rsplit(".", 1)[0] if "." in blocks else ""
    root = model.get_submodule(owner) if owner else model
    name = _child(root, _FINAL_NORM)
    if name:
        return f"{owner}.{name}" if owner else name
    return None


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


def family_of(model: nn.Module) -> Family:
    """The family map of a loaded transformers model."""
    config = model.config
    mt = config.model_type
    check_supported(config)
    n = num_layers(config)
    shared_path = _find_shared_blocks(model, config)
    blocks = shared_path or _find_blocks(model, n)
    block = model.get_submodule(blocks)[0]
    attn, q, k, v, fused = _find_attn(block)
    o = _find_o(block, attn)
    mlp, mlp_in, mlp_out, router, experts = _find_mlp(block, attn)
    is_causal = _is_causal(model)
    embed = _path_of(model, model.get_input_embeddings())
    out_emb = model.get_output_embeddings() if is_causal else None
    unembed = _path_of(model, out_emb)
    pos = next(
        (
            name
            for name, mod in model.named_modules()
            if name.rsplit(".", 1)[-1] in _POS
            and isinstance(mod, nn.Embedding)
            and not name.startswith(blocks)
        ),
        None,
    )
    o_mod = block.get_submodule(o)
    conv1d = type(o_mod).__name__ == "Conv1D"
    fold = mt in _SMOOTH_FOLDS and not fused and mlp_in and mlp_out
    ln_attn = _child(block, ("input_layernorm",)) if fold else None
    ln_mlp = _child(block, ("post_attention_layernorm",)) if fold else None
    native = not getattr(type(model), "_supports_attention_backend", False)
    mid = _find_mid(block, config, is_causal, mlp, mlp_in)
    return Family(
        name=mt,
        causal=is_causal,
        embed=embed,
        blocks=blocks,
        attn=attn,
        q=q or fused,
        k=k or fused,
        v=v or fused,
        o=o,
        mlp_in=mlp_in,
        mlp_out=mlp_out,
        ln_attn=ln_attn,
        ln_mlp=ln_mlp,
        final_norm=_find_final_norm(model, blocks) if is_causal else None,
        unembed=unembed,
        pos_embed=pos,
        fused_qkv=fused is not None,
        qkv_layout=_QKV_LAYOUT.get(mt, "concat") if fused else None,
        conv1d=conv1d,
        post_ln=not is_causal,
        native_attention=native,
        mlp=mlp,
        router=router,
        experts=experts,
        mid=mid,
        shared=shared_path is not None,
        gated_mlp=len(mlp_in) == 2 or (len(mlp_in) == 1 and mlp_in[0].endswith("gate_up_proj")),
    )


def _find_mid(block: nn.Module, config, is_causal: bool, mlp: str | None, mlp_in) -> str | None:
    """The module whose input is the residual stream between attention and MLP, if the block is sequential."""
    if not is_causal:  # post-LN encoders: the MLP reads the normed attention residual
        return mlp_in[0] if mlp_in else None
    kids = dict(block.named_children())
    mt = config.model_type
    if mt == "opt":
        return "final_layer_norm" if getattr(config, "do_layer_norm_before", True) else "fc1"
    if mt == "gpt_neox" and getattr(config, "use_parallel_residual", True):
        return None
    for name in ("pre_feedforward_layernorm", "ln_2", "norm_2"):
        if name in kids:
            return name
    if "post_attention_layernorm" in kids:
        return "post_attention_layernorm" if "input_layernorm" in kids else mlp
    return None


def _is_causal(model: nn.Module) -> bool:
    """A decoder (causal attention) — whatever head it carries (LM head or classifier)."""
    cfg = model.config
    if getattr(cfg, "is_decoder", False):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and cfg.model_type not in ENCODER_TYPES


#: encoders that transformers also maps to a *ForCausalLM (as a decoder when is_decoder=True)
ENCODER_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "electra",
    "distilbert",
    "albert",
    "deberta-v2",
    "deberta",
    "camembert",
    "ernie",
    "xlm-roberta-xl",
    "megatron-bert",
    "roberta-prelayernorm",
    "data2vec-text",
}
