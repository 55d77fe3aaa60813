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
from .models.families import Family, family_for


class LM:
    """A language model opened by lmscope. ``lm.model`` is the plain transformers model."""

    def __init__(self, model: nn.Module, tokenizer, name: str = "model", path: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.path = path
        self.config = model.config
        self.family: Family = family_for(self.config.model_type)
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        for i, block in enumerate(self.blocks):  # lets the attention function know its layer
            block.get_submodule(self.family.attn)._lmscope_layer = i

    # -- structure -------------------------------------------------------------------------------
    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.family.blocks)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def is_causal(self) -> bool:
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
        return getattr(self.config, "num_key_value_heads", None) or self.n_heads

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_positions(self) -> int:
        return getattr(self.config, "max_position_embeddings", None) or getattr(
            self.config, "n_positions", 2048
        )

    def _in_features(self, linear: nn.Module) -> int:
        return linear.weight.shape[0] if self.family.conv1d else linear.in_features

    def n_heads_at(self, layer: int) -> int:
        """Query heads actually present in ``layer`` (fewer than ``n_heads`` after head pruning)."""
        return self._in_features(self.blocks[layer].get_submodule(self.family.o)) // self.head_dim

    def n_kv_heads_at(self, layer: int) -> int:
        attn = self.blocks[layer].get_submodule(self.family.attn)
        groups = getattr(attn, "num_key_value_groups", 1)
        return max(1, self.n_heads_at(layer) // groups)

    def d_mlp_at(self, layer: int) -> int:
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
        if self.is_causal:
            kwargs.setdefault("use_cache", False)
        return self.model(**inputs, **kwargs)

    def output_of(self, out) -> torch.Tensor:
        """Logits for a causal LM, the last hidden state for an encoder."""
        return out.logits if self.is_causal else out.last_hidden_state

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
        names = expand(capture, self.n_layers, has_logits=self.is_causal) if capture else []
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
            f"LM({self.name!r}, family={self.family.name}, layers={self.n_layers}, heads={self.n_heads}"
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
