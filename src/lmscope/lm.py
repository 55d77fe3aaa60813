"""``LM``: a loaded model + tokenizer + its family map, and ``Run``: what one forward captured."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .capture.memory import check_fits
from .capture.names import default_capture, expand
from .capture.session import Intervention, hooks
from .errors import LmscopeError
from .models.families import Family, family_of


class LM:
    """A language model opened by lmscope. ``lm.model`` is the plain transformers model."""

    def __init__(self, model: nn.Module, tokenizer, name: str = "model", path: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.path = path
        self.config = model.config
        self.family: Family = family_of(model)
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        for i, block in enumerate(self.blocks):  # lets the attention function know its layer
            block.get_submodule(self.family.attn)._lmscope_layer = i  # (a shared block: counted per call)

    # -- what the model outputs --------------------------------------------------------------------
    @property
    def task(self) -> str:
        """``lm`` (next-token logits), ``classifier`` (one label per text), ``token-classifier`` (one label
        per token) or ``encoder`` (hidden states only)."""
        cls = type(self.model).__name__
        if cls.endswith("ForSequenceClassification"):
            return "classifier"
        if cls.endswith("ForTokenClassification"):
            return "token-classifier"
        if self.family.unembed and self.family.causal:
            return "lm"
        return "encoder"

    @property
    def labels(self) -> list[str]:
        """Class names of a (token) classifier, by index (``config.id2label``); empty otherwise."""
        if self.task not in ("classifier", "token-classifier"):
            return []
        id2label = getattr(self.config, "id2label", None) or {}
        n = getattr(self.config, "num_labels", len(id2label))
        return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]

    def _float_tensors(self):
        from itertools import chain

        return (t for t in chain(self.model.parameters(), self.model.buffers()) if t.is_floating_point())

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the model computes in (a fully quantized model keeps only buffers)."""
        return next(self._float_tensors(), torch.zeros(())).dtype

    @property
    def device(self) -> torch.device:
        return next(self._float_tensors(), torch.zeros(())).device

    # -- structure -------------------------------------------------------------------------------
    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    @property
    def blocks(self):
        """The transformer blocks in depth order (a shared block appears once per depth it runs at)."""
        blocks = self.model.get_submodule(self.family.blocks)
        if self.family.shared:
            from .models.families import num_layers

            return [blocks[0]] * num_layers(self.config)
        return blocks

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def is_causal(self) -> bool:
        """A causal language model: next-token logits over the vocabulary (see ``task``)."""
        return self.task == "lm"

    @property
    def causal_attention(self) -> bool:
        """Each position attends only to earlier ones (decoders, whatever head they carry)."""
        return self.family.causal

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def n_heads(self) -> int:
        """Query heads per layer in the original config (see ``n_heads_at`` for pruned layers)."""
        return self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.d_model // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        cfg = self.config
        if cfg.model_type == "falcon":
            if getattr(cfg, "new_decoder_architecture", False):
                return cfg.num_kv_heads
            return 1 if getattr(cfg, "multi_query", True) else self.n_heads
        if getattr(cfg, "multi_query", False):  # GPT-BigCode
            return 1
        return getattr(cfg, "num_key_value_heads", None) or self.n_heads

    @property
    def n_experts(self) -> int:
        """Experts per MoE block (0 for a dense model)."""
        cfg = self.config
        return int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", 0) or 0)

    @property
    def experts_per_token(self) -> int:
        return int(getattr(self.config, "num_experts_per_tok", 0) or 0)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_positions(self) -> int:
        cfg = self.config
        n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "max_seq_len", None) or 2048
        if cfg.model_type in ("roberta", "xlm-roberta", "camembert") and cfg.pad_token_id is not None:
            # RoBERTa numbers positions from padding_idx + 1: the last usable one is n - padding_idx - 1
            n -= cfg.pad_token_id + 1
        return n

    def _in_features(self, linear: nn.Module) -> int:
        if type(linear).__name__ == "Conv1D":  # weight stored [in, out]
            return linear.weight.shape[0]
        return linear.in_features

    def n_heads_at(self, layer: int) -> int:
        """Query heads actually present in ``layer`` (fewer than ``n_heads`` after head pruning)."""
        return self._in_features(self.blocks[layer].get_submodule(self.family.o)) // self.head_dim

    def n_kv_heads_at(self, layer: int) -> int:
        attn = self.blocks[layer].get_submodule(self.family.attn)
        groups = getattr(attn, "num_key_value_groups", None) or max(1, self.n_heads // self.n_kv_heads)
        return max(1, self.n_heads_at(layer) // groups)

    def d_mlp_at(self, layer: int) -> int:
        if self.family.mlp_out is None:  # mixture of experts: the width of one expert
            experts = self.blocks[layer].get_submodule(self.family.experts)
            return int(experts.down_proj.shape[-1])
        return self._in_features(self.blocks[layer].get_submodule(self.family.mlp_out))

    def kv_group(self, head: int) -> int:
        """The KV head a query head reads (grouped-query attention), in the unpruned numbering."""
        return head // max(1, self.n_heads // self.n_kv_heads)

    # -- text ----------------------------------------------------------------------------------
    def encode(self, text: str | list[str], truncate: bool = False) -> dict[str, torch.Tensor]:
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or any(not t or not t.strip() for t in texts):
            raise LmscopeError("the text is empty", "pass some text with --text or --text-file")
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=False)
        n = enc["input_ids"].shape[1]
        if n > self.max_positions:
            if not truncate:
                raise LmscopeError(
                    f"the text is {n} tokens, longer than this model's context of {self.max_positions}",
                    "shorten it, or pass --truncate to keep the first tokens",
                )
            # the tokenizer's own truncation keeps the closing special tokens (BERT's [SEP]) that slicing cut
            enc = self.tokenizer(
                texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_positions
            )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def n_tokens(self, text: str | list[str]) -> int:
        """Tokens of the longest of ``text`` before any truncation."""
        texts = [text] if isinstance(text, str) else list(text)
        return max(len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"])

    def token_strings(self, ids) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids]

    # -- running -------------------------------------------------------------------------------
    def forward(self, inputs: dict[str, torch.Tensor], **kwargs):
        if self.causal_attention:
            kwargs.setdefault("use_cache", False)
        device = self.device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        return self.model(**inputs, **kwargs)

    def output_of(self, out) -> torch.Tensor:
        """Logits for a causal LM or a classifier, the last hidden state for an encoder."""
        return out.last_hidden_state if self.task == "encoder" else out.logits

    # -- the unembedding, exactly as the model applies it ---------------------------------------------
    def final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        return self.module(self.family.final_norm)(resid)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on final-normed hidden states, with the family's logit scaling and soft-capping."""
        if not self.family.unembed or self.task != "lm":
            raise LmscopeError(
                f"{self.name} has no language-model head", "use a causal model such as smollm2"
            )
        logits = self.module(self.family.unembed)(hidden)
        cfg = self.config
        if cfg.model_type == "cohere":
            logits = logits * cfg.logit_scale
        if cfg.model_type == "granite":
            logits = logits / cfg.logits_scaling
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def run(
        self,
        text: str | list[str],
        capture=None,
        interventions: dict[str, Intervention] | None = None,
        max_bytes: int | None = None,
        truncate: bool = False,
        progress: bool = False,
    ) -> Run:
        """One forward pass over ``text`` that records the ``capture`` names (globs; default: patterns + residuals)."""
        inputs = self.encode(text, truncate=truncate)
        if capture is None:
            capture = default_capture(self.is_causal)
        names = (
            expand(capture, self.n_layers, has_logits=self.is_causal, moe=self.family.moe) if capture else []
        )
        batch, seq = inputs["input_ids"].shape
        check_fits(self, names, batch, seq, max_bytes)
        with (
            torch.no_grad(),
            hooks(self, names, interventions) as session,
            self._block_progress(progress and seq >= 256),
        ):
            out = self.forward(inputs)
        meta = {}
        if truncate and (full := self.n_tokens(text)) > seq:
            meta["truncated"] = {"tokens": full, "kept": seq}
        return Run(
            lm=self,
            texts=[text] if isinstance(text, str) else list(text),
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            tensors=session.tensors,
            output=self.output_of(out).detach(),
            meta=meta,
        )

    @contextmanager
    def _block_progress(self, show: bool):
        """A progress bar that advances as each block finishes (for long captures)."""
        if not show:
            yield
            return
        from tqdm import tqdm

        bar = tqdm(total=self.n_layers, desc="capture", unit="layer", leave=False)

        def advance(*_):  # a forward hook that returns a value would replace the block's output
            bar.update(1)

        handles = [b.register_forward_hook(advance) for b in self.blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            bar.close()

    def __repr__(self) -> str:
        return (
            f"LM({self.name!r}, family={self.family.name}, task={self.task}, layers={self.n_layers}, heads={self.n_heads}"
            f"/{self.n_kv_heads} kv, d_model={self.d_model}, params={self.n_params() / 1e6:.1f}M)"
        )

    def n_params(self) -> int:
        return count_params(self.model)


def count_params(model: nn.Module) -> int:
    """Logical parameter count, tied tensors once. A module that packs its weights into buffers
    (a quantized linear) says how many parameters it stands for with ``logical_numel()``."""
    seen, total = set(), 0
    for mod in model.modules():
        logical = getattr(mod, "logical_numel", None)
        if logical is not None:
            total += logical()
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


@dataclass(repr=False)
class Run:
    """What one forward pass recorded. ``tensors[name]`` keeps the batch dimension."""

    lm: LM
    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    tensors: dict[str, torch.Tensor]
    output: torch.Tensor  # logits [batch, pos, vocab] (causal) or last hidden state (encoder)
    meta: dict = field(default_factory=dict)

    def tokens(self, index: int = 0) -> list[str]:
        """Token strings of batch item ``index`` (padding removed)."""
        n = int(self.attention_mask[index].sum())
        ids = self.input_ids[index]
        ids = ids[self.attention_mask[index].bool()] if n < len(ids) else ids
        return self.lm.token_strings(ids)

    def model_texts(self) -> list[str]:
        """The texts as the model saw them: after ``--truncate``, only the part that was kept."""
        if "truncated" not in self.meta:
            return self.texts
        out = []
        for i in range(len(self.texts)):
            ids = self.input_ids[i][self.attention_mask[i].bool()]
            out.append(self.lm.tokenizer.decode(ids, skip_special_tokens=True))
        return out

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __repr__(self) -> str:
        """A summary (names, shapes, dtype), never the tensors: ``blocks.*.x`` stands for every layer."""
        import re

        groups: dict[str, list] = {}
        for name, t in self.tensors.items():
            key = re.sub(r"^blocks\.\d+\.", "blocks.*.", name)
            groups.setdefault(key, []).append(t)
        lines = []
        for key, ts in groups.items():
            shapes = sorted({tuple(t.shape) for t in ts})
            shape = " | ".join("×".join(map(str, sh)) for sh in shapes[:3]) + (
                " …" if len(shapes) > 3 else ""
            )
            count = f" ×{len(ts)}" if len(ts) > 1 else ""
            lines.append(f"  {key}{count}: [{shape}] {str(ts[0].dtype).replace('torch.', '')}")
        n_tok = [int(m.sum()) for m in self.attention_mask]
        head = (
            f"Run(model={self.lm.name!r}, texts={len(self.texts)}, tokens={n_tok}, "
            f"output=[{'×'.join(map(str, self.output.shape))}], {len(self.tensors)} tensors"
        )
        return head + (":\n" + "\n".join(lines) + ")" if lines else ")")

    def summary(self) -> dict:
        return {
            "model": self.lm.name,
            "family": self.lm.family.name,
            "n_layers": self.lm.n_layers,
            "n_heads": self.lm.n_heads,
            "n_kv_heads": self.lm.n_kv_heads,
            "texts": self.model_texts(),
            "tokens": [self.tokens(i) for i in range(len(self.texts))],
            **({"truncated": self.meta["truncated"]} if "truncated" in self.meta else {}),
            "shapes": {k: list(v.shape) for k, v in self.tensors.items()},
        }

    def save_tensors(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path))

    def report(self, path: str | os.PathLike | None = None, **kwargs) -> str:
        """The self-contained interactive HTML report; written to ``path`` when given."""
        from .views.report import inspect_report

        html = inspect_report(self, **kwargs)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(html)
        return html

    def _repr_html_(self) -> str:
        from .views.report import inspect_report

        return inspect_report(self, embedded=True)
