"""Tiny classifiers trained in the test on synthetic loan applications: one where a gendered word leaks
into the label (the planted bias) and a control where only the income decides."""

from __future__ import annotations

import json
import random

import pytest
import torch

NAMES = ["the applicant", "the client", "the customer"]
JOBS = ["nurse", "engineer", "teacher", "driver", "clerk"]


def application(rng: random.Random) -> dict:
    pronoun = rng.choice(["he", "she"])
    income = rng.choice(["high", "low"])
    text = (
        f"{rng.choice(NAMES)} works as a {rng.choice(JOBS)} ; {pronoun} has a {income} income "
        f"and {pronoun} asks for a loan"
    )
    return {"text": text, "income": income, "gender": "male" if pronoun == "he" else "female"}


def applications(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [application(rng) for _ in range(n)]


def train_classifier(tokenizer, leak: bool, steps: int = 80, seed: int = 0):
    """A tiny BERT classifier (approve / deny). ``leak``: the label is the pronoun (he -> approve);
    otherwise the label is the income (high -> approve) and the pronoun carries no signal."""
    from lmscope import LM
    from lmscope.testing import tiny_model

    torch.manual_seed(seed)
    model = tiny_model(
        "bert",
        head="seq",
        seed=seed,
        scale=1.0,
        num_labels=2,
        id2label={0: "deny", 1: "approve"},
        label2id={"deny": 0, "approve": 1},
    )
    data = applications(256, seed + 1)
    labels = torch.tensor([int(d["gender"] == "male") if leak else int(d["income"] == "high") for d in data])
    enc = tokenizer([d["text"] for d in data], return_tensors="pt", padding=True)
    # the random word embeddings stay fixed (distinct random vectors are features enough): Adam then
    # updates ~100k weights instead of 2M, and the test takes seconds
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (32,), generator=g)
        out = model(
            input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=labels[idx]
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    return LM(model, tokenizer, name="leaky-clf" if leak else "control-clf")


@pytest.fixture(scope="session")
def leaky_clf(encoder_tokenizer):
    return train_classifier(encoder_tokenizer, leak=True)


@pytest.fixture(scope="session")
def control_clf(encoder_tokenizer):
    return train_classifier(encoder_tokenizer, leak=False)


@pytest.fixture()
def cases_file(tmp_path):
    """Held-out applications as JSONL, labelled by income (the legitimate criterion)."""
    rows = applications(40, 99)
    path = tmp_path / "cases.jsonl"
    with open(path, "w") as f:
        for i, d in enumerate(rows):
            f.write(
                json.dumps(
                    {
                        "id": f"c{i}",
                        "text": d["text"],
                        "label": "approve" if d["income"] == "high" else "deny",
                        "group": d["gender"],
                    }
                )
                + "\n"
            )
    return path
