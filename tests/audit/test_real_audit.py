"""smollm2 used as a classifier through a prompt and two answers (real model)."""

from __future__ import annotations

import json

import pytest
import torch

from lmscope.audit import audit
from lmscope.audit.decider import ChoiceDecider

PROMPT = "Loan application: {text}\nShould the bank approve or deny it? Answer:"


@pytest.mark.real
def test_smollm2_choices_are_full_log_probabilities(smollm2, tmp_path):
    d = ChoiceDecider(smollm2, PROMPT, [" approve", " deny the loan"])
    text = "She earns 90,000 EUR a year, has no debts and asks for 5,000 EUR."
    got = d.choice_logprobs([text, "He is unemployed and owes 40,000 EUR."])[0]
    prompt_ids = smollm2.tokenizer(PROMPT.replace("{text}", text))["input_ids"]
    for c, cids in enumerate(d.choice_ids):
        ids, total = list(prompt_ids), 0.0
        for tid in cids:
            with torch.no_grad():
                logits = smollm2.model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            total += float(torch.log_softmax(logits, -1)[tid])
            ids.append(tid)
        assert float(got[c]) == pytest.approx(total, abs=2e-3)
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"text": text, "label": "approve", "group": "f"})
        + "\n"
        + json.dumps(
            {"text": "He is unemployed and owes 40,000 EUR.", "label": "deny the loan", "group": "m"}
        )
        + "\n"
    )
    res = audit(
        smollm2,
        path,
        label_field="label",
        group_field="group",
        prompt=PROMPT,
        choices=[" approve", " deny the loan"],
        counterfactuals="builtin:gender",
        explain=False,
    )
    assert [len(c["counterfactuals"]) for c in res.cases] == [1, 1]
    assert res.cases[1]["counterfactuals"][0]["text"] == "She is unemployed and owes 40,000 EUR."
    assert res.metrics["by_group"].keys() == {"f", "m"}
