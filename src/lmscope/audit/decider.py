"""The decision a model makes on one text, as class probabilities, and the explanation of that decision.

Two kinds of model decide: a sequence classifier (softmax of its class logits, classes from ``id2label``)
and a causal LM used as a classifier (``--prompt "...{text}..." --choices " approve" " deny"``), where each
choice is scored by its full log-probability after the prompt (the sum over its tokens, so choices of
several tokens work) and the probabilities are the softmax over the choices' log-probabilities.

The explanation is the attribution of the decision margin: for a classifier the logit of the predicted
class minus the runner-up's; for a causal LM the logit of the predicted choice's token minus the runner-up
choice's token at the first position where the two choices differ (after the prompt and their common
prefix) — the token where the model commits to one answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LmscopeError
from ..explain.targets import Objective, Target

TEXT_SLOT = "{text}"


@dataclass
class Encoded:
    """An input the explanation runs on: token ids [n], their character spans in ``full_text`` (None for
    special or appended tokens), and where the case's own text starts inside ``full_text``."""

    ids: torch.Tensor
    spans: list[tuple[int, int] | None]
    full_text: str
    text_start: int


class Decider:
    """``probabilities(texts)`` -> [B, C]; ``classes``; ``class_index(value)``; ``objective(text, a, b)``."""

    kind = ""
    classes: list[str]

    def __init__(self, lm, batch_size: int = 16, truncate: bool = False):
        self.lm = lm
        self.batch_size = batch_size
        self.truncate = truncate

    def class_index(self, value: str, where: str) -> int:
        """A label from the data (a class name, or its index) -> class index; anything else is refused."""
        names = [c.strip() for c in self.classes]
        if value in self.classes:
            return self.classes.index(value)
        if value.strip() in names:
            return names.index(value.strip())
        if value.strip().lstrip("-").isdigit() and 0 <= int(value) < len(self.classes):
            return int(value)
        raise LmscopeError(
            f"{where}: label {value!r} is not one of the {self.what}",
            "use one of: " + ", ".join(f"{i}={c.strip()}" for i, c in enumerate(self.classes)),
        )

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encoded(self, text: str) -> Encoded:
        raise NotImplementedError

    def objective(self, text: str, target: int, contrast: int, baseline: str = "pad") -> Objective:
        raise NotImplementedError

    def _spans(self, text: str, ids: torch.Tensor, add_special: bool = True) -> list:
        """Character spans of ``ids`` in ``text`` (a fast tokenizer's offsets), None for special tokens."""
        tok = self.lm.tokenizer
        if not getattr(tok, "is_fast", False):
            return [None] * len(ids)
        enc = tok(text, add_special_tokens=add_special, return_offsets_mapping=True, truncation=False)
        if list(enc["input_ids"])[: len(ids)] != ids.tolist()[: len(enc["input_ids"])]:
            return [None] * len(ids)
        special = set(tok.all_special_ids or [])
        out = []
        for i, tid in enumerate(ids.tolist()):
            if i >= len(enc["offset_mapping"]) or tid in special:
                out.append(None)
                continue
            s, e = enc["offset_mapping"][i]
            out.append((int(s), int(e)) if e > s else None)
        return out


class ClassifierDecider(Decider):
    kind = "classifier"
    what = "classifier's classes"

    def __init__(self, lm, batch_size: int = 16, truncate: bool = False):
        super().__init__(lm, batch_size, truncate)
        self.classes = list(lm.labels)
        if len(self.classes) < 2:
            raise LmscopeError("the classifier has fewer than two classes", "audit a model with id2label")

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.lm.encode(texts[i : i + self.batch_size], truncate=self.truncate)
            logits = self.lm.output_of(self.lm.forward(enc)).float()  # [B, C]
            out.append(torch.softmax(logits, -1).cpu())
        return torch.cat(out)

    def encoded(self, text: str) -> Encoded:
        ids = self.lm.encode(text, truncate=self.truncate)["input_ids"][0]
        return Encoded(ids, self._spans(text, ids), text, 0)

    def objective(self, text: str, target: int, contrast: int, baseline: str = "pad") -> tuple:
        enc = self.encoded(text)
        tgt = Target(
            kind="label_contrast",
            token_id=target,
            token=self.classes[target],
            contrast_id=contrast,
            contrast=self.classes[contrast],
        )
        return Objective(self.lm, enc.ids, tgt, baseline), enc


class ChoiceDecider(Decider):
    """A causal LM that picks one of ``choices`` after ``prompt`` (which holds ``{text}`` once)."""

    kind = "choices"
    what = "choices"

    def __init__(self, lm, prompt: str, choices: list[str], batch_size: int = 16, truncate: bool = False):
        super().__init__(lm, batch_size, truncate)
        if not lm.is_causal:
            raise LmscopeError(
                f"--prompt/--choices need a causal language model; {lm.name} is a {lm.task}",
                "pass a causal LM (e.g. --model smollm2), or drop --prompt/--choices for a classifier",
            )
        if prompt is None or prompt.count(TEXT_SLOT) != 1:
            n = 0 if prompt is None else prompt.count(TEXT_SLOT)
            raise LmscopeError(
                f"--prompt must hold {TEXT_SLOT} exactly once (it holds it {n} times)",
                'e.g. --prompt "Application: {text}\\nDecision:"',
            )
        if not choices or len(choices) < 2:
            raise LmscopeError("--choices needs at least two answers", 'e.g. --choices " approve" " deny"')
        tok = lm.tokenizer
        self.choice_ids = []
        for c in choices:
            if not c or not c.strip():
                raise LmscopeError("a choice is empty", 'pass answers such as --choices " approve" " deny"')
            self.choice_ids.append(tok(c, add_special_tokens=False)["input_ids"])
        for i in range(len(choices)):
            for j in range(i):
                if choices[i] == choices[j] or self.choice_ids[i] == self.choice_ids[j]:
                    raise LmscopeError(
                        f"the choices {choices[j]!r} and {choices[i]!r} are the same"
                        + ("" if choices[i] == choices[j] else " after tokenization"),
                        "pass different answers",
                    )
        self.prompt = prompt
        self.classes = list(choices)
        self.n_choice_tokens = [len(c) for c in self.choice_ids]

    def fill(self, text: str) -> tuple[str, int]:
        return self.prompt.replace(TEXT_SLOT, text), self.prompt.index(TEXT_SLOT)

    def prompt_ids(self, text: str) -> list[int]:
        filled, _ = self.fill(text)
        ids = self.lm.tokenizer(filled)["input_ids"]  # the tokenizer's own special tokens (BOS) included
        longest = max(self.n_choice_tokens)
        if len(ids) + longest > self.lm.max_positions:
            if not self.truncate:
                raise LmscopeError(
                    f"the prompt is {len(ids)} tokens, too long for this model's context of "
                    f"{self.lm.max_positions} with the choices",
                    "shorten the texts or the prompt, or pass --truncate",
                )
            ids = ids[: self.lm.max_positions - longest]
        return ids

    @torch.no_grad()
    def choice_logprobs(self, texts: list[str]) -> torch.Tensor:
        """log p(choice | prompt(text)) for every text and choice [B, C]: the sum over the choice's tokens."""
        rows, where = [], []
        for b, text in enumerate(texts):
            p = self.prompt_ids(text)
            for c, cids in enumerate(self.choice_ids):
                rows.append(p + cids)
                where.append((b, c, len(p)))
        out = torch.zeros(len(texts), len(self.classes), dtype=torch.float64)
        pad = self.lm.tokenizer.pad_token_id or 0
        step = max(1, self.batch_size)
        for i in range(0, len(rows), step):
            chunk = rows[i : i + step]
            n = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), n), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for r, row in enumerate(chunk):  # right padding: positions of the real tokens are unchanged
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            logits = self.lm.output_of(self.lm.forward({"input_ids": ids, "attention_mask": mask}))
            logp = torch.log_softmax(logits.double(), -1)  # [rows, n, vocab]
            for r, (b, c, start) in enumerate(where[i : i + step]):
                cids = self.choice_ids[c]
                # token j of the choice sits at start + j and is predicted at start + j - 1
                pos = torch.arange(start - 1, start - 1 + len(cids))
                out[b, c] = logp[r, pos, torch.tensor(cids)].sum().cpu()
        return out

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        return torch.softmax(self.choice_logprobs(texts), -1).float()

    def encoded(self, text: str) -> Encoded:
        filled, start = self.fill(text)
        ids = torch.tensor(self.prompt_ids(text))
        return Encoded(ids, self._spans(filled, ids), filled, start)

    def objective(self, text: str, target: int, contrast: int, baseline: str = "pad") -> tuple:
        enc = self.encoded(text)
        a, b = self.choice_ids[target], self.choice_ids[contrast]
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        ids, spans = enc.ids, list(enc.spans)
        if k:  # the common prefix of the two answers is part of the input; the decision is at token k
            ids = torch.cat([ids, torch.tensor(a[:k])])
            spans += [None] * k
        if k >= min(len(a), len(b)):  # one answer is a prefix of the other: explain the longer one's token
            longer = a if len(a) > len(b) else b
            tgt = Target(kind="token", token_id=longer[k], token=self.lm.tokenizer.decode([longer[k]]))
        else:
            tok = self.lm.tokenizer
            tgt = Target(
                kind="contrast",
                token_id=a[k],
                token=tok.decode([a[k]]),
                contrast_id=b[k],
                contrast=tok.decode([b[k]]),
            )
        enc = Encoded(ids, spans, enc.full_text, enc.text_start)
        return Objective(self.lm, ids, tgt, baseline), enc


def make_decider(lm, prompt=None, choices=None, batch_size: int = 16, truncate: bool = False) -> Decider:
    if prompt is not None or choices:
        return ChoiceDecider(lm, prompt, list(choices or []), batch_size, truncate)
    if getattr(lm, "task", "") != "classifier":
        raise LmscopeError(
            f"{lm.name} is a {lm.task}, not a sequence classifier",
            'pass a *ForSequenceClassification model, or use a causal LM with --prompt "...{text}..." '
            '--choices " approve" " deny"',
        )
    return ClassifierDecider(lm, batch_size, truncate)
