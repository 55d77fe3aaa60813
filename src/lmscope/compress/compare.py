"""Explanations before vs after compression: what changed inside the model, not only its perplexity.

For one text, ``compare(original, compressed)`` measures
- per head: Jensen–Shannon divergence (bits, 0..1) between the two models' attention patterns, averaged
  over query positions; heads that pruning removed are reported as ``removed``;
- per layer: logit-lens drift, KL(original ‖ compressed) of the lens distributions (nats, mean over
  positions); layers that were removed are ``removed``;
- per attribution method: Spearman correlation and top-k overlap of the token attributions for the same
  target (the original model's top prediction);
- the output: top-1 agreement and KL over positions.
Heads and layers are lined up through ``config.lmscope_origin`` (written by the pruners), so a pruned
model's head 3 is compared with the original head it came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LmscopeError
from ..views.html import Reportable

DEFAULT_METHODS = ("saliency", "input_x_gradient", "occlusion")
LN2 = math.log(2.0)


def _origin(lm) -> tuple[list[int], dict[int, list[int]]]:
    from .prune._origin import get_origin

    o = get_origin(lm.model, lm.n_layers, lm.n_heads)
    return o["layers"], {i: o["heads"][str(i)] for i in range(lm.n_layers)}


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence in bits along the last axis (0 = identical, 1 = disjoint supports)."""
    p, q = p.double().clamp_min(0), q.double().clamp_min(0)
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)) / LN2


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) in nats along the last axis, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


def overlap_k(k: int, n_tokens: int) -> int:
    """The k actually used for a top-k overlap on ``n_tokens``: at most half of them (at least 1), since
    with k near n any two rankings share almost all of their top k (k = n gives 1.00 always)."""
    return max(1, min(k, n_tokens // 2))


def topk_overlap(a, b, k: int) -> float:
    """|top-k(|a|) ∩ top-k(|b|)| / k."""
    k = min(k, len(a))
    ta = set(torch.tensor(a).abs().topk(k).indices.tolist())
    tb = set(torch.tensor(b).abs().topk(k).indices.tolist())
    return len(ta & tb) / k


@dataclass
class Comparison(Reportable):
    a_name: str
    b_name: str
    text: str
    tokens: list[str]
    heads: list[dict]  # {layer, head, js | None, status, b_layer, b_head} in the original numbering
    layers: list[dict]  # {layer, status, lens_kl, mean_head_js, b_layer}
    attribution: dict[str, dict]
    top1_agreement: float
    output_kl: float
    structure: str = ""
    notes: list[str] = field(default_factory=list)

    # -- summaries ------------------------------------------------------------------------------------
    def most_changed_heads(self, n: int = 10) -> list[dict]:
        kept = [h for h in self.heads if h["js"] is not None]
        return sorted(kept, key=lambda h: -h["js"])[:n]

    def most_changed_layers(self, n: int = 5) -> list[dict]:
        kept = [x for x in self.layers if x["lens_kl"] is not None]
        return sorted(kept, key=lambda x: -x["lens_kl"])[:n]

    @property
    def removed_heads(self) -> list[tuple[int, int]]:
        return [(h["layer"], h["head"]) for h in self.heads if h["status"] == "removed"]

    @property
    def max_head_js(self) -> float:
        return max((h["js"] for h in self.heads if h["js"] is not None), default=0.0)

    def to_dict(self) -> dict:
        return {
            "a": self.a_name,
            "b": self.b_name,
            "text": self.text,
            "tokens": self.tokens,
            "top1_agreement": self.top1_agreement,
            "output_kl": self.output_kl,
            "attribution": self.attribution,
            "layers": self.layers,
            "heads": self.heads,
            "most_changed_heads": self.most_changed_heads(),
            "most_changed_layers": self.most_changed_layers(),
            "removed_heads": [list(x) for x in self.removed_heads],
            "structure": self.structure,
            "notes": self.notes,
            "units": {
                "js": "Jensen-Shannon divergence of attention rows, bits (0..1), mean over query positions",
                "lens_kl": "KL(a || b) of logit-lens distributions, nats, mean over positions",
                "output_kl": "KL(a || b) of next-token distributions, nats, mean over positions",
            },
        }

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def to_text(self) -> str:
        lines = [
            f"compare {self.a_name} -> {self.b_name} on {len(self.tokens)} tokens",
            f"output: top-1 agreement {self.top1_agreement:.1%}, KL {self.output_kl:.4f} nats/token",
        ]
        if self.structure:
            lines.append(f"structure: {self.structure}")
        removed = self.removed_heads
        lines.append(
            f"heads: {len(removed)} removed; max JS among kept {self.max_head_js:.3f} bits; most changed: "
            + ", ".join(f"L{h['layer']}H{h['head']} {h['js']:.3f}" for h in self.most_changed_heads(5))
        )
        rl = [x["layer"] for x in self.layers if x["status"] == "removed"]
        lines.append(
            "layers (logit-lens KL): "
            + ", ".join(f"L{x['layer']} {x['lens_kl']:.3f}" for x in self.most_changed_layers(5))
            + (f"; removed: {rl}" if rl else "")
        )
        for m, v in self.attribution.items():
            if "error" in v:
                lines.append(f"attribution {m}: not computed ({v['error']})")
            else:
                sp = "n/a" if v["spearman"] is None else f"{v['spearman']:.3f}"
                lines.append(f"attribution {m}: Spearman {sp}, top-{v['k']} overlap {v['topk_overlap']:.2f}")
        lines.extend(self.notes)
        return "\n".join(lines)

    def build_report(self):
        """The HTML report (``views.compress.compare_report``)."""
        from ..views.compress import compare_report

        return compare_report(self)


def _attribution(lm_a, lm_b, text: str, methods, k: int) -> dict[str, dict]:
    from ..explain.attribution.base import get_method
    from ..explain.faithfulness import spearman
    from ..explain.targets import Objective, encode_prompt, make_target

    out = {}
    ids = encode_prompt(lm_a, text)
    obj_a = Objective(lm_a, ids, make_target(lm_a))
    target = obj_a.target  # A's top prediction (or predicted class), explained in both models
    obj_b = Objective(lm_b, ids, target)
    for name in methods:
        try:
            method = get_method(name)
            sa = method.attribute(obj_a).scores
            sb = method.attribute(obj_b).scores
        except LmscopeError as e:
            out[name] = {"error": str(e)}
            continue
        k_used = overlap_k(k, len(sa))
        out[name] = {
            "spearman": spearman(sa, sb),
            "topk_overlap": topk_overlap(sa, sb, k_used),
            "k": k_used,
            "k_requested": k,
            "target": target.token,
            "a": [float(x) for x in sa],
            "b": [float(x) for x in sb],
        }
    return out


@torch.no_grad()
def compare(lm_a, lm_b, text: str, methods=DEFAULT_METHODS, k: int = 5, truncate: bool = False) -> Comparison:
    """Compare the internals of ``lm_a`` (the original) and ``lm_b`` (a compressed version) on ``text``."""
    classifiers = lm_a.task == lm_b.task == "classifier"
    if not (lm_a.is_causal and lm_b.is_causal) and not classifiers:
        raise LmscopeError(
            "compare needs two causal language models or two sequence classifiers",
            "use e.g. --model smollm2 --against small/",
        )
    if classifiers and lm_a.labels != lm_b.labels:
        raise LmscopeError(
            "the two classifiers have different classes", "compare a classifier with its compressed copy"
        )
    if lm_a.vocab_size != lm_b.vocab_size or lm_a.d_model != lm_b.d_model:
        raise LmscopeError(
            f"{lm_b.name} is not a compressed version of {lm_a.name} (vocabulary or width differ)",
            "pass the original model with --model and its compressed copy with --against",
        )
    names = ["blocks.*.attn.pattern", "blocks.*.resid_post"]
    run_a = lm_a.run(text, capture=names, truncate=truncate)
    run_b = lm_b.run(text, capture=names, truncate=truncate)
    if not torch.equal(run_a.input_ids, run_b.input_ids):
        raise LmscopeError(
            "the two models tokenize the text differently", "compare models with one tokenizer"
        )
    layers_a, heads_a = _origin(lm_a)
    layers_b, heads_b = _origin(lm_b)
    where_b = {orig: i for i, orig in enumerate(layers_b)}

    heads, layers = [], []
    from ..explain.lens import lens_logits

    for i, orig_layer in enumerate(layers_a):
        pa = run_a.tensors[f"blocks.{i}.attn.pattern"][0]
        j = where_b.get(orig_layer)
        layer_js = []
        for h, orig_head in enumerate(heads_a[i]):
            row = {
                "layer": orig_layer,
                "head": orig_head,
                "js": None,
                "status": "removed",
                "b_layer": j,
                "b_head": None,
            }
            if j is not None and orig_head in heads_b[j]:
                hb = heads_b[j].index(orig_head)
                pb = run_b.tensors[f"blocks.{j}.attn.pattern"][0, hb]
                js = float(js_divergence(pa[h], pb).mean())
                row.update(js=js, status="kept", b_head=hb)
                layer_js.append(js)
            heads.append(row)
        lens_kl = None
        if j is not None and not classifiers:
            la = torch.log_softmax(lens_logits(lm_a, run_a.tensors[f"blocks.{i}.resid_post"][0].float()), -1)
            lb = torch.log_softmax(lens_logits(lm_b, run_b.tensors[f"blocks.{j}.resid_post"][0].float()), -1)
            lens_kl = float(kl_divergence(la, lb).mean())
        layers.append(
            {
                "layer": orig_layer,
                "status": "kept" if j is not None else "removed",
                "b_layer": j,
                "lens_kl": lens_kl,
                "mean_head_js": sum(layer_js) / len(layer_js) if layer_js else None,
            }
        )
    la = torch.log_softmax(run_a.output[0].float(), -1)
    lb = torch.log_softmax(run_b.output[0].float(), -1)
    agreement = float((la.argmax(-1) == lb.argmax(-1)).double().mean())
    output_kl = float(kl_divergence(la, lb).mean())
    attribution = _attribution(lm_a, lm_b, text, methods, k) if methods else {}
    from .structure import structure_diff

    structure = structure_diff(lm_a, lm_b).summary()
    notes = []
    n_tok = run_a.input_ids.shape[1]
    if methods and overlap_k(k, n_tok) != k:
        notes.append(
            f"top-k overlap: k = {overlap_k(k, n_tok)}, not the {k} asked for — at most half of the {n_tok} "
            "tokens, because a k near the token count makes the overlap trivially 1"
        )
    return Comparison(
        a_name=lm_a.name,
        b_name=lm_b.name,
        text=text,
        tokens=run_a.tokens(0),
        heads=heads,
        layers=layers,
        attribution=attribution,
        top1_agreement=agreement,
        output_kl=output_kl,
        structure=structure,
        notes=notes,
    )
