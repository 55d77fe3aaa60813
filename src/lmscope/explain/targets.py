"""What an attribution explains: a scalar ``f`` of the model's output, and the input it is computed on.

``Objective`` binds a model, one tokenized input and a target (next token, named token, contrast, or
the cosine similarity of two texts' pooled embeddings for encoders). Every attribution method only
talks to an ``Objective``: ``f_embeds`` (differentiable, on token embeddings) and ``f_masks``
(forward-only, tokens absent where the mask is 0 are replaced by the baseline embedding, length kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LmscopeError

BASELINES = ("pad", "eos", "zero", "mask")


@dataclass(frozen=True)
class Target:
    """A scalar of the model output. ``kind``: ``token`` (logit of ``token_id``), ``contrast``
    (logit of ``token_id`` minus logit of ``contrast_id``), ``cosine`` (encoders: cosine similarity
    of the mean-pooled last hidden states of the text and ``pair``), or for sequence classifiers ``label``
    (the logit of class ``token_id``, named ``token``) and ``label_contrast`` (minus class ``contrast_id``)."""

    kind: str
    token_id: int | None = None
    token: str | None = None
    contrast_id: int | None = None
    contrast: str | None = None
    pair: str | None = None

    def to_dict(self) -> dict:
        d = {"kind": self.kind}
        if self.kind in ("token", "contrast"):
            d.update(token=self.token, token_id=self.token_id)
        if self.kind == "contrast":
            d.update(contrast=self.contrast, contrast_id=self.contrast_id)
        if self.kind in ("label", "label_contrast"):
            d.update(label=self.token, label_index=self.token_id)
        if self.kind == "label_contrast":
            d.update(contrast_label=self.contrast, contrast_index=self.contrast_id)
        if self.kind == "cosine":
            d.update(pair=self.pair)
        return d

    def describe(self) -> str:
        if self.kind == "label":
            return f"logit of class {self.token!r}"
        if self.kind == "label_contrast":
            return f"logit of class {self.token!r} − logit of class {self.contrast!r}"
        if self.kind == "token":
            return f"logit of {self.token!r}"
        if self.kind == "contrast":
            return f"logit {self.token!r} − logit {self.contrast!r}"
        return "cosine similarity of the mean-pooled embeddings of the text and the pair"


def single_token_id(lm, text: str, flag: str = "--target") -> int:
    """The id of ``text`` when it is exactly one token; otherwise an error showing its tokenization."""
    if text is None or text == "":
        raise LmscopeError(f"{flag} is empty", f'pass one token, e.g. {flag} " Mary"')
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return int(ids[0])
    pieces = [lm.tokenizer.decode([i]) for i in ids]
    shown = " + ".join(repr(p) for p in pieces)
    first = repr(pieces[0]) if pieces else "''"
    raise LmscopeError(
        f"{flag} {text!r} is {len(ids)} tokens ({shown}), it must be exactly one token",
        f"pass the first token {first} (e.g. {flag} {first}), or another string that is a single token",
    )


def leading_space_hint(lm, text: str, value: str | None, flag: str = "--target") -> str | None:
    """A note when ``value`` lacks the leading space a next word usually has: "Paris" after "is" is a
    different token from " Paris". None when there is nothing to say."""
    if not value or value[0].isspace() or not text or text[-1].isspace():
        return None
    ids = lm.tokenizer(value, add_special_tokens=False)["input_ids"]
    spaced = lm.tokenizer(" " + value, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or len(spaced) != 1:
        return None
    return (
        f"{flag} {value!r} is token {ids[0]} ({value!r}, no leading space); after {text.split()[-1]!r} the next "
        f"word is usually {' ' + value!r} (token {spaced[0]}) — did you mean {' ' + value!r}?"
    )


def label_index(lm, label, flag: str = "--target-label") -> int:
    """A class of a sequence classifier by name (``config.id2label``) or index."""
    labels = lm.labels
    if str(label) in labels:
        return labels.index(str(label))
    try:
        i = int(label)
    except (TypeError, ValueError):
        i = None
    if i is not None and 0 <= i < len(labels):
        return i
    raise LmscopeError(
        f"{flag} {label!r} is not a class of this classifier",
        "use one of: " + ", ".join(f"{j}={n}" for j, n in enumerate(labels)),
    )


def classifier_target(lm, target_label=None, contrast_label=None) -> Target:
    """The class logit to explain (default: the predicted class, resolved by ``Objective``)."""
    if contrast_label is not None:
        if target_label is None:
            raise LmscopeError("--contrast-label needs --target-label", "pass both, e.g. --target-label 1")
        a, b = label_index(lm, target_label), label_index(lm, contrast_label, "--contrast-label")
        if a == b:
            raise LmscopeError("--target-label and --contrast-label are the same class", "pass two classes")
        return Target(
            kind="label_contrast", token_id=a, token=lm.labels[a], contrast_id=b, contrast=lm.labels[b]
        )
    if target_label is None:
        return Target(kind="label")
    a = label_index(lm, target_label)
    return Target(kind="label", token_id=a, token=lm.labels[a])


def make_target(
    lm,
    target: str | None = None,
    contrast: str | None = None,
    pair: str | None = None,
    target_label=None,
    contrast_label=None,
) -> Target:
    """Build a ``Target`` from user strings. ``target=None`` on a causal model means the top prediction
    (resolved later by ``Objective``); for a sequence classifier ``target_label=None`` means the predicted
    class."""
    task = getattr(lm, "task", "lm")
    if task == "token-classifier":
        raise LmscopeError(
            "explain works on one output per text; this is a token classifier (one label per token)",
            "use lmscope inspect to see each token's label, or a sequence classifier / causal LM",
        )
    if task == "classifier":
        if target is not None or contrast is not None or pair is not None:
            raise LmscopeError(
                "--target/--contrast/--pair are for language models and encoders; this is a classifier "
                f"({', '.join(lm.labels)})",
                "pass --target-label NAME (default: the predicted class) and optionally --contrast-label",
            )
        return classifier_target(lm, target_label, contrast_label)
    if target_label is not None or contrast_label is not None:
        raise LmscopeError(
            "--target-label/--contrast-label need a sequence classifier (a model with id2label)",
            "use --target/--contrast with a causal LM, or --pair with an encoder",
        )
    if not lm.is_causal:
        if target is not None or contrast is not None:
            raise LmscopeError(
                "--target/--contrast need a causal language model; this one is an encoder",
                "for an encoder pass --pair TEXT: lmscope explains the cosine similarity of the two texts",
            )
        if not pair or not pair.strip():
            raise LmscopeError(
                "an encoder needs a second text to compare with",
                "pass --pair TEXT (lmscope explains the cosine similarity of the two texts' embeddings)",
            )
        return Target(kind="cosine", pair=pair)
    if pair is not None:
        raise LmscopeError(
            "--pair is for encoders (cosine similarity of two texts)",
            "drop --pair, or use --target/--contrast with a causal model",
        )
    if contrast is not None:
        if target is None:
            raise LmscopeError(
                "--contrast needs --target", 'pass both, e.g. --target " Mary" --contrast " John"'
            )
        a = single_token_id(lm, target, "--target")
        b = single_token_id(lm, contrast, "--contrast")
        if a == b:
            raise LmscopeError("--target and --contrast are the same token", "pass two different tokens")
        return Target(kind="contrast", token_id=a, token=target, contrast_id=b, contrast=contrast)
    if target is None:
        return Target(kind="token")  # the model's top prediction, filled in by Objective
    a = single_token_id(lm, target, "--target")
    return Target(kind="token", token_id=a, token=target)


def encode_prompt(lm, text: str, chat: bool = False, truncate: bool = False) -> torch.Tensor:
    """Token ids [n] of ``text``; with ``chat`` the tokenizer's chat template wraps it as a user turn
    (its special tokens are kept and shown)."""
    if chat:
        if not getattr(lm.tokenizer, "chat_template", None):
            raise LmscopeError("this tokenizer has no chat template", "drop --chat")
        if not text or not text.strip():
            raise LmscopeError("the text is empty", "pass some text with --text or --text-file")
        templated = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = lm.tokenizer(templated, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if len(ids) > lm.max_positions:
            raise LmscopeError(f"the templated text is {len(ids)} tokens, too long", "shorten the text")
        return ids
    return lm.encode(text, truncate=truncate)["input_ids"][0]


def baseline_id(lm, baseline: str) -> int | None:
    """Token id whose embedding is the baseline (None for the zero embedding)."""
    tok = lm.tokenizer
    if baseline not in BASELINES:
        raise LmscopeError(f"unknown baseline '{baseline}'", f"use one of: {', '.join(BASELINES)}")
    if baseline == "zero":
        return None
    tid = {"pad": tok.pad_token_id, "eos": tok.eos_token_id, "mask": tok.mask_token_id}[baseline]
    if tid is None:
        others = [b for b in BASELINES if b != baseline]
        raise LmscopeError(f"this tokenizer has no {baseline} token", f"use --baseline {' or '.join(others)}")
    return int(tid)


#: rows per batch of ``Objective.f_many`` with shared prefixes: up to this many tokens
SHARED_BATCH_TOKENS = 4096


@dataclass
class Objective:
    """One input + one target: the scalar ``f`` every attribution method explains.

    ``ids`` [n] are the input tokens. ``baseline`` names the "absent token" (pad/eos/mask token
    embedding, or the zero embedding). With ``exclude_special`` the special tokens (BOS, chat
    template markers, [CLS]/[SEP]) are never perturbed: they stay in every baseline and get score 0.
    """

    lm: object
    ids: torch.Tensor
    target: Target
    baseline: str = "pad"
    exclude_special: bool = False
    batch_size: int = 32
    position: int = -1  # the position whose output is explained (causal: always the last)
    special: list[bool] = field(default_factory=list)
    n_forwards: int = 0
    #: share work between methods: f of a mask row and the gradient at the input are computed once
    #: per objective (values are row-wise, so sharing changes no number beyond float rounding)
    cache: bool = True

    def __post_init__(self):
        lm = self.lm
        self.ids = self.ids.detach().long().reshape(-1)
        self.n = len(self.ids)
        self.embedding = lm.module(lm.family.embed)
        self.baseline_token = baseline_id(lm, self.baseline)
        special_ids = set(lm.tokenizer.all_special_ids or [])
        self.special = [int(i) in special_ids for i in self.ids]
        self.free = torch.tensor(
            [not (s and self.exclude_special) for s in self.special], dtype=torch.bool
        )  # tokens that attributions may perturb
        with torch.no_grad():
            self.x = self.embedding(self.ids[None])[0].detach()  # [n, d]
            if self.baseline_token is None:
                base = torch.zeros_like(self.x)
            else:
                base = self.embedding(torch.tensor([[self.baseline_token]]))[0, 0].expand_as(self.x)
            self.b = torch.where(self.free[:, None], base, self.x).contiguous()
        self._pair = None
        self._f_cache: dict[bytes, float] = {}
        self._grad_x = None
        self._f_x = self._f_baseline = None
        if self.target.kind == "cosine":
            pair_ids = self.lm.encode(self.target.pair)
            with torch.no_grad():
                h = lm.output_of(lm.forward(pair_ids))
            m = pair_ids["attention_mask"][..., None].to(h.dtype)
            self._pair = ((h * m).sum(1) / m.sum(1))[0]
        if self.target.kind in ("token", "label") and self.target.token_id is None:
            with torch.no_grad():
                logits = self._forward(self.x[None])
            top = int(logits[0].argmax())
            if self.target.kind == "token":  # the model's top prediction
                self.target = Target(kind="token", token_id=top, token=lm.tokenizer.decode([top]))
            else:  # the predicted class
                self.target = Target(kind="label", token_id=top, token=lm.labels[top])
            self._f_x = float(self.metric(logits)[0])  # that forward's f(x)

    @property
    def f_x(self) -> float:
        """``f`` at the input; computed when first asked for, or taken from the first gradient at the input
        (the same forward, bit-equal), so a gradient method costs no extra forward for it."""
        if self._f_x is None:
            with torch.no_grad():
                self._f_x = float(self.f_embeds(self.x[None])[0])
        return self._f_x

    @property
    def f_baseline(self) -> float:
        """``f`` at the baseline (every perturbable token absent); computed when first asked for (the
        randomization check's objective never needs it)."""
        if self._f_baseline is None:
            with torch.no_grad():
                self._f_baseline = float(self.f_embeds(self.b[None])[0])
        return self._f_baseline

    # -- the model as a function of embeddings --------------------------------------------------
    def _forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Logits at the explained position [B, vocab] (causal) or last hidden states [B, n, d]."""
        lm = self.lm
        self.n_forwards += embeds.shape[0]
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        if lm.is_causal:
            out = lm.forward({"inputs_embeds": embeds, "attention_mask": mask}, logits_to_keep=1)
            return out.logits[:, -1]
        return lm.output_of(lm.forward({"inputs_embeds": embeds, "attention_mask": mask}))

    def metric(self, out: torch.Tensor) -> torch.Tensor:
        t = self.target
        if t.kind in ("token", "label"):
            return out[:, t.token_id]
        if t.kind in ("contrast", "label_contrast"):
            return out[:, t.token_id] - out[:, t.contrast_id]
        pooled = out.mean(1)
        return torch.nn.functional.cosine_similarity(pooled, self._pair[None].to(pooled.dtype), dim=-1)

    def f_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """``f`` for a batch of embedding sequences [B, n, d] -> [B] (differentiable)."""
        return self.metric(self._forward(embeds))

    def grad(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f [B], ∂f/∂embeds [B, n, d]) for a batch; items are independent."""
        embeds = embeds.detach().requires_grad_(True)
        with torch.enable_grad():
            f = self.f_embeds(embeds)
            (g,) = torch.autograd.grad(f.sum(), embeds)
        return f.detach(), g

    @torch.no_grad()
    def f_many(self, embeds: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Forward-only ``f`` for many sequences, in batches.

        With ``cache`` and causal attention, each batch computes every distinct prefix once
        (``prefix.shared_prefixes``), in batches of up to ``SHARED_BATCH_TOKENS`` tokens so that rows
        sharing prefixes meet in one batch."""
        from .prefix import prefix_index, shared_prefixes

        plain = not (self.cache and self.lm.causal_attention and batch_size is None)
        # rows that share no prefix (IG's path points) keep the plain batches, so their values stay the same
        if plain or len(prefix_index(embeds)[0]) == embeds.shape[0] * embeds.shape[1]:
            bs = batch_size or self.batch_size
            return torch.cat([self.f_embeds(embeds[i : i + bs]) for i in range(0, len(embeds), bs)])

        bs = max(self.batch_size, SHARED_BATCH_TOKENS // max(1, self.n))
        family = self.lm.family
        blocks = self.lm.module(family.blocks)
        mlp = None if family.moe else family.mlp
        out = []
        for i in range(0, len(embeds), bs):
            with shared_prefixes(blocks, embeds[i : i + bs], mlp):
                out.append(self.f_embeds(embeds[i : i + bs]))
        return torch.cat(out)

    def masked(self, masks: torch.Tensor) -> torch.Tensor:
        """Embeddings where tokens with mask 0 are replaced by the baseline: masks [B, n] -> [B, n, d]."""
        m = masks.to(self.x.dtype)[..., None]
        return m * self.x[None] + (1 - m) * self.b[None]

    def grad_at_input(self) -> torch.Tensor:
        """∂f/∂embeddings at the input [n, d] (computed once per objective when ``cache``)."""
        if self._grad_x is None or not self.cache:
            f, g = self.grad(self.x[None])
            self._grad_x = g[0]
            if self._f_x is None:
                self._f_x = float(f[0])
        return self._grad_x

    def f_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """``f`` with absent tokens (mask 0) replaced by the baseline token (length kept), float64.

        With ``cache`` each distinct mask row is run once per objective, however many methods,
        curves or random orders ask for it; the rows still missing run together in batches."""
        masks = masks.clone().bool() | ~self.free[None]
        if not self.cache:
            return self.f_many(self.masked(masks)).double()
        keys = [row.numpy().tobytes() for row in masks]
        missing = {}
        for i, key in enumerate(keys):
            if key not in self._f_cache and key not in missing:
                missing[key] = i
        if missing:
            rows = masks[list(missing.values())]
            values = self.f_many(self.masked(rows)).double().tolist()
            self._f_cache.update(zip(missing, values))
        return torch.tensor([self._f_cache[k] for k in keys], dtype=torch.float64)

    @torch.no_grad()
    def f_deleted(self, drop: list[int]) -> float:
        """``f`` with the tokens at ``drop`` removed from the sequence (it gets shorter)."""
        keep = [i for i in range(self.n) if i not in set(drop)]
        if not keep:
            return float("nan")
        return float(self.f_embeds(self.x[keep][None])[0])

    @property
    def tokens(self) -> list[str]:
        return self.lm.token_strings(self.ids)

    def attention_patterns(self) -> list[torch.Tensor]:
        """Exact attention patterns per layer [heads, n, n] for this input."""
        from ..capture.session import hooks

        names = [f"blocks.{i}.attn.pattern" for i in range(self.lm.n_layers)]
        with torch.no_grad(), hooks(self.lm, names) as s:
            self.lm.forward(
                {"input_ids": self.ids[None], "attention_mask": torch.ones(1, self.n, dtype=torch.long)}
            )
        return [s.tensors[n][0].float() for n in names]

    def describe(self) -> dict:
        d = self.target.to_dict()
        d.update(
            description=self.target.describe(),
            position=self.n - 1 if self.lm.is_causal else None,
            value=self.f_x,
            baseline_value=self.f_baseline,
            baseline=self.baseline,
        )
        return d
