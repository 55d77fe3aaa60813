"""``lmscope audit`` throughput: cases/s for a classifier and for smollm2 used as a classifier, with and without
counterfactuals and explanations, against the plain transformers forward on the same texts (the peer: what
scoring alone costs outside lmscope).

    OMP_NUM_THREADS=2 python benchmarks/audit.py [--cases 16] [--explain-cases 2] [--sanity] [--ray]

``--ray`` repeats every row with ``ray="auto", workers=2`` (``lmscope audit --ray auto --workers 2``): each Ray
row starts and stops its own local runtime and each worker opens the model, and its time includes both (as a
user's run pays them). Every row, in process or on Ray, audits in batches of ceil(cases / 2), so two workers each
get work. ``--rows 1,2,3`` runs only those rows (1 decisions, 2 + counterfactuals, 3 + explanations without
counterfactuals, 4 + explanations with them).

The classifier is minilm's BERT with a fresh 2-class head (the real model size; the head's weights do not
change the cost). The texts are synthetic loan applications, each with a pronoun and a first name, so every
case gets one counterfactual per swap list.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch

import lmscope
from lmscope import LM
from lmscope.audit import audit

NAMES = ["John", "Mary", "Ahmed", "Priya", "Carlos", "Mei"]


def cases_file(n: int) -> str:
    rng = random.Random(0)
    path = os.path.join(tempfile.mkdtemp(), "cases.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            pronoun = rng.choice(["he", "she"])
            income = rng.choice(["high", "low"])
            text = (
                f"{rng.choice(NAMES)} is {rng.randint(25, 60)} years old; {pronoun} works as a nurse, has a "
                f"{income} income and asks for a loan of {rng.randint(2, 40)},000 EUR for a car."
            )
            label = "approve" if income == "high" else "deny"
            f.write(json.dumps({"id": f"c{i}", "text": text, "label": label, "group": pronoun}) + "\n")
    return path


def minilm_classifier() -> LM:
    """minilm with a fresh 2-class head, saved to a folder so Ray workers can open it by path."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmscope.models.sources import builtin_path

    path = builtin_path("minilm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label={0: "deny", 1: "approve"}, label2id={"deny": 0, "approve": 1}
    )
    folder = tempfile.mkdtemp(prefix="minilm-clf-")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(path).save_pretrained(folder)
    lm = lmscope.load(folder, progress=False)
    lm.name = "minilm+2-class head"
    return lm


@torch.no_grad()
def peer_seconds(lm: LM, texts: list[str], prompt=None, choices=None, batch: int = 16) -> float:
    """Plain transformers: one padded forward per batch (classifier), or one per choice row (causal LM)."""
    t0 = time.perf_counter()
    tok = lm.tokenizer
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        if prompt is None:
            enc = tok(chunk, return_tensors="pt", padding=True)
            lm.model(**enc).logits.softmax(-1)
        else:
            rows = [prompt.replace("{text}", t) + c for t in chunk for c in choices]
            tok.padding_side = "right"
            enc = tok(rows, return_tensors="pt", padding=True)
            lm.model(**enc, use_cache=False).logits.log_softmax(-1)
    return time.perf_counter() - t0


def run(lm, data, n, n_explain, label, prompt=None, choices=None, sanity=False, use_ray=False, rows=None):
    texts = [json.loads(line)["text"] for line in open(data)][:n]
    peer_seconds(lm, texts[:2], prompt, choices)  # warm-up (first-call allocations)
    # warm-up: imports fairlearn / scikit-learn and pandas once, as any long-running audit pays once
    audit(
        lm,
        data,
        label_field="label",
        group_field="group",
        prompt=prompt,
        choices=choices,
        max_cases=2,
        explain=False,
    )
    peer = peer_seconds(lm, texts, prompt, choices)
    print(f"\n{label}: plain transformers forward {n / peer:.2f} cases/s ({n} cases)")
    variants = [
        ("decisions", n, dict(counterfactuals=None, explain=False)),
        ("+ counterfactuals (gender, names)", n, dict(counterfactuals="builtin:gender,names", explain=False)),
        ("+ explanations, no counterfactuals", n_explain, dict(counterfactuals=None, sanity=False)),
        (
            "+ explanations (3 methods, faithfulness)",
            n_explain,
            dict(counterfactuals="builtin:gender,names", sanity=False),
        ),
    ]
    if rows:
        variants = [v for k, v in enumerate(variants) if str(k + 1) in rows]
    if sanity:
        variants.append(
            ("+ randomization check", n_explain, dict(counterfactuals="builtin:gender,names", sanity=True))
        )
    out = []
    for name, m, kw in variants:
        for where in ("in-process", "ray auto, 2 workers") if use_ray else ("in-process",):
            extra = dict(ray="auto", workers=2) if where != "in-process" else {}
            t0 = time.perf_counter()
            res = audit(
                lm,
                data,
                label_field="label",
                group_field="group",
                prompt=prompt,
                choices=choices,
                max_cases=m,
                batch_size=max(1, -(-m // 2)),
                **kw,
                **extra,
            )
            s = time.perf_counter() - t0
            n_cf = sum(len(c["counterfactuals"]) for c in res.cases)
            ratio = (s / m) / (peer / n)
            out.append((name, where, m / s, ratio, n_cf))
            print(
                f"  {name:38s} {where:20s} {m / s:8.3f} cases/s   {ratio:7.1f}x the plain forward per case   "
                f"({m} cases, {n_cf} counterfactuals, {s:.1f} s)",
                flush=True,
            )
    return out


def ray_phases(lm, data, n: int = 32) -> None:
    """Where a Ray row's time goes: the runtime's start, one actor's start (it opens the model), and a batch of
    ``n`` cases (decisions only) on that actor, its threads set as ``--ray`` sets them."""
    import ray

    from lmscope.audit.data import Cases
    from lmscope.audit.distributed import _auditor_class
    from lmscope.scan.distributed import _start

    batch = list(Cases(data, "text", "label", "group").cases())[:n]
    settings = dict(swaps=[], explain=False, methods=None, granularity="word", sanity=False)
    t = time.perf_counter()
    _start(ray, "auto", 2)
    print(f"ray phases: ray.init {time.perf_counter() - t:.1f} s", end="", flush=True)
    threads = max(1, int(ray.available_resources().get("CPU", 2)) // 2)
    t = time.perf_counter()
    actor = _auditor_class(ray).remote(
        lm.path, "float32", threads, dict(prompt=None, choices=None, batch_size=n)
    )
    ray.get(actor.run.remote(batch[:1], settings))
    print(f", one actor started with the model loaded {time.perf_counter() - t:.1f} s", end="", flush=True)
    t = time.perf_counter()
    ray.get(actor.run.remote(batch, settings))
    print(
        f", {len(batch)} cases on it ({threads} thread) {time.perf_counter() - t:.1f} s", end="", flush=True
    )
    t = time.perf_counter()
    ray.shutdown()
    print(f", ray.shutdown {time.perf_counter() - t:.1f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument(
        "--explain-cases", type=int, default=2, help="cases for the runs with explanations (slow)"
    )
    ap.add_argument("--sanity", action="store_true", help="also time the model-randomization check")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--ray", action="store_true", help="also run every row with --ray auto --workers 2")
    ap.add_argument(
        "--rows", default=None, help="only these rows, e.g. 1,2,3 (1 decisions ... 4 explanations)"
    )
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}, cases {args.cases}, load average {os.getloadavg()}")
    data = cases_file(args.cases)
    opts = dict(sanity=args.sanity, use_ray=args.ray, rows=args.rows.split(",") if args.rows else None)
    if not args.skip_minilm:
        clf = minilm_classifier()
        run(clf, data, args.cases, args.explain_cases, "minilm classifier", **opts)
        if args.ray:
            ray_phases(clf, data)
    if not args.skip_smollm2:
        lm = lmscope.load("smollm2", progress=False)
        run(
            lm,
            data,
            args.cases,
            args.explain_cases,
            "smollm2 as a classifier (prompt + choices ' approve' / ' deny')",
            prompt="Loan application: {text}\nDecision (approve or deny):",
            choices=[" approve", " deny"],
            **opts,
        )
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
