"""``lmscope audit`` end to end: outputs from JSONL / CSV / Parquet agree, a causal LM used through a prompt and
choices, and every bad input: one stderr line, exit 2, nothing written."""

from __future__ import annotations

import csv
import json

import pytest

from lmscope.cli.main import main

ROWS = [
    {"id": "a1", "text": "He has a high income and he asks for a loan", "label": "approve", "group": "m"},
    {"id": "a2", "text": "She has a low income; her loan is large", "label": "deny", "group": "f"},
    {"id": "a3", "text": "Mary's income is high and she owns a house", "label": "approve", "group": "f"},
    {"id": "a4", "text": "John has debts and no savings", "label": "deny", "group": "m"},
]


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory, encoder_tokenizer):
    from lmscope.testing import tiny_model

    path = tmp_path_factory.mktemp("clf")
    model = tiny_model(
        "bert",
        head="seq",
        num_labels=2,
        id2label={0: "deny", 1: "approve"},
        label2id={"deny": 0, "approve": 1},
    )
    model.save_pretrained(path)
    encoder_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory, build_tiny, causal_tokenizer):
    path = tmp_path_factory.mktemp("causal")
    build_tiny("llama").save_pretrained(path)
    causal_tokenizer.save_pretrained(path)
    return str(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _err_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("\r")]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


BASE = ["--label-field", "label", "--group-field", "group", "--counterfactuals", "builtin:gender,names"]


def test_audit_jsonl_csv_parquet_agree(tmp_path, clf_dir, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = {"jsonl": _jsonl(tmp_path / "c.jsonl", ROWS)}
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    data["csv"] = str(tmp_path / "c.csv")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "c.parquet")
    data["parquet"] = str(tmp_path / "c.parquet")
    results = {}
    for kind, path in data.items():
        out = tmp_path / f"out-{kind}"
        rc = main(["audit", "--model", clf_dir, "--data", path, *BASE, "--out", str(out), "--quiet"])
        assert rc == 0, capsys.readouterr().err
        assert {p.name for p in out.iterdir()} == {"audit.json", "cases.csv", "report.html"}
        results[kind] = json.loads((out / "audit.json").read_text())
    ref = results["jsonl"]
    assert [c["id"] for c in ref["cases"]] == ["a1", "a2", "a3", "a4"]
    for kind in ("csv", "parquet"):
        for a, b in zip(ref["cases"], results[kind]["cases"]):
            assert a["prediction"] == b["prediction"] and a["probabilities"] == b["probabilities"]
    # every case has a counterfactual for gender; a3 and a4 also for names
    n_cf = {c["id"]: [cf["swap"] for cf in c["counterfactuals"]] for c in ref["cases"]}
    assert n_cf == {"a1": ["gender"], "a2": ["gender"], "a3": ["gender", "names"], "a4": ["names"]}
    a3 = ref["cases"][2]["counterfactuals"][1]
    assert a3["text"] == "John's income is high and she owns a house" and a3["pairs"] == ["mary→john"]
    rows = list(csv.DictReader(open(tmp_path / "out-jsonl" / "cases.csv")))
    assert len(rows) == 4 + 5 and rows[0]["variant"] == "original" and rows[1]["variant"] == "gender"
    html = (tmp_path / "out-jsonl" / "report.html").read_text()
    for title in (
        "Findings",
        "Confusion matrix",
        "Group metrics",
        "Calibration",
        "Counterfactual invariance",
    ):
        assert title in html
    assert "http://" not in html.replace("http://www.w3.org", "")  # offline: no external resources
    assert ref["metrics"]["by_group"]["m"]["count"] == 2
    assert sum(map(sum, ref["confusion"]["counts"])) == 4


def test_audit_causal_lm_with_prompt_and_choices(tmp_path, causal_dir, capsys):
    data = _jsonl(tmp_path / "c.jsonl", ROWS[:2])
    out = tmp_path / "out"
    rc = main(
        [
            "audit",
            "--model",
            causal_dir,
            "--data",
            data,
            "--label-field",
            "label",
            "--prompt",
            "Application: {text}\nDecision:",
            "--choices",
            " approve",
            " deny",
            "--counterfactuals",
            "builtin:gender",
            "--granularity",
            "token",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "audit.json").read_text())
    assert res["decider"]["kind"] == "choices" and res["decider"]["classes"] == [" approve", " deny"]
    case = res["cases"][0]
    assert sum(case["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    ex = case["explanation"]
    assert "−" in ex["target"]  # the contrast of the two answers' first tokens
    inside = [u for u in ex["units"] if u["span"] is not None]
    assert "".join(u["text"] for u in inside).strip().startswith("He has")  # only the case text has spans
    assert any(u.get("swapped") for u in ex["units"])


@pytest.mark.parametrize(
    "rows,args,message",
    [
        (ROWS, ["--text-field", "body"], "line 1 has no field 'body'"),
        (ROWS, ["--label-field", "outcome"], "has no field 'outcome'"),
        (
            [{"text": "fine", "label": "maybe"}],
            ["--label-field", "label"],
            "line 1: label 'maybe' is not one",
        ),
        ([], [], "holds no cases"),
        (None, [], "line 2 is not JSON"),
        (ROWS, ["--prompt", "Decision:", "--choices", " a", " b"], r"\{text\} exactly once"),
        (ROWS, ["--prompt", "{text}", "--choices", " a", " a"], "choices are the same"),
        (ROWS, ["--prompt", "{text}"], "--prompt and --choices go together"),
        (ROWS, ["--counterfactuals", "builtin:race"], "no built-in swap list 'race'"),
        (ROWS, ["--counterfactuals", "SWAPFILE"], "not valid JSON"),
        (ROWS, ["--methods", "nope"], "unknown attribution method 'nope'"),
        (ROWS, ["--positive", "maybe"], "--positive: label 'maybe'"),
    ],
)
def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, clf_dir, capsys, rows, args, message):
    path = tmp_path / "c.jsonl"
    if rows is None:
        path.write_text(json.dumps(ROWS[0]) + "\n{broken\n")
    else:
        _jsonl(path, rows)
    swapfile = tmp_path / "swaps.json"
    swapfile.write_text("{oops")
    args = [str(swapfile) if a == "SWAPFILE" else a for a in args]
    out = tmp_path / "out"
    rc = main(["audit", "--model", clf_dir, "--data", str(path), *args, "--out", str(out), "--quiet"])
    assert rc == 2
    line = _err_line(capsys)
    assert line.startswith("lmscope: error: ") and " — " in line
    assert __import__("re").search(message, line), line
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_a_causal_lm_without_prompt_and_a_classifier_with_one_are_refused(
    tmp_path, clf_dir, causal_dir, capsys
):
    data = _jsonl(tmp_path / "c.jsonl", ROWS)
    rc = main(["audit", "--model", causal_dir, "--data", data, "--out", str(tmp_path / "o1"), "--quiet"])
    assert rc == 2 and "not a sequence classifier" in _err_line(capsys)
    rc = main(
        ["audit", "--model", clf_dir, "--data", data, "--prompt", "{text}", "--choices", " a", " b"]
        + ["--out", str(tmp_path / "o2"), "--quiet"]
    )
    assert rc == 2 and "need a causal language model" in _err_line(capsys)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_missing_data_file_and_bad_csv(tmp_path, clf_dir, capsys):
    rc = main(
        ["audit", "--model", clf_dir, "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]
    )
    assert rc == 2 and "does not exist" in _err_line(capsys)
    bad = tmp_path / "c.csv"
    bad.write_text("text,label\nfine,approve\ntoo,many,fields\n")
    rc = main(
        [
            "audit",
            "--model",
            clf_dir,
            "--data",
            str(bad),
            "--label-field",
            "label",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "line 3 has 3 fields" in _err_line(capsys)
    assert not (tmp_path / "o").exists()


def test_resume_after_a_kill_gives_the_same_outputs(tmp_path, clf_dir, capsys, monkeypatch):
    from lmscope.audit import engine

    data = _jsonl(tmp_path / "c.jsonl", ROWS * 2)
    args = ["audit", "--model", clf_dir, "--data", data, *BASE, "--batch-size", "3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    capsys.readouterr()

    real = engine._audit_batch
    calls = []

    def dies_on_third_batch(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a kill leaves: two batches checkpointed, no output
        return real(*a, **kw)

    monkeypatch.setattr(engine, "_audit_batch", dies_on_third_batch)
    assert main([*args, "--out", str(tmp_path / "part")]) == 130
    capsys.readouterr()
    assert not (tmp_path / "part").exists()
    partial = tmp_path / ".part.audit-partial"
    assert len((partial / "records.jsonl").read_text().splitlines()) == 6
    monkeypatch.setattr(engine, "_audit_batch", real)
    # another data file: refused
    other = _jsonl(tmp_path / "d.jsonl", ROWS)
    other_args = [a if a != data else other for a in args]
    assert main([*other_args, "--out", str(tmp_path / "part"), "--resume"]) == 2
    assert "cannot resume" in _err_line(capsys)
    assert partial.exists()  # a refused resume keeps the work done
    assert main([*args, "--out", str(tmp_path / "part"), "--resume"]) == 0
    assert not partial.exists()
    full = json.loads((tmp_path / "full" / "audit.json").read_text())
    part = json.loads((tmp_path / "part" / "audit.json").read_text())
    full.pop("seconds"), part.pop("seconds")
    assert part == full
    assert (tmp_path / "full" / "cases.csv").read_text() == (tmp_path / "part" / "cases.csv").read_text()
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "no interrupted audit" in _err_line(capsys)


@pytest.mark.ray
def test_ray_gives_the_same_audit(tmp_path, clf_dir, capsys):
    pytest.importorskip("ray")
    data = _jsonl(tmp_path / "c.jsonl", ROWS * 2)
    args = ["audit", "--model", clf_dir, "--data", data, *BASE, "--batch-size", "2", "--quiet", "--no-report"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "auto", "--workers", "2"]) == 0
    local = json.loads((tmp_path / "local" / "audit.json").read_text())
    on_ray = json.loads((tmp_path / "ray" / "audit.json").read_text())
    local.pop("seconds"), on_ray.pop("seconds")
    assert on_ray == local


def test_three_class_classifier_tsv_and_id_field(tmp_path, encoder_tokenizer, capsys):
    from lmscope import LM
    from lmscope.audit import audit
    from lmscope.testing import tiny_model

    lm = LM(tiny_model("bert", head="seq"), encoder_tokenizer, name="clf3")  # negative / neutral / positive
    path = tmp_path / "c.tsv"
    path.write_text(
        "key\tbody\tgold\nx1\tShe liked it, she said\tpositive\nx2\tHe hated it\t0\nx3\tok\tneutral\n"
    )
    res = audit(
        lm, path, text_field="body", label_field="gold", id_field="key", counterfactuals="builtin:gender"
    )
    assert [c["id"] for c in res.cases] == ["x1", "x2", "x3"]
    assert [c["label"] for c in res.cases] == ["positive", "negative", "neutral"]  # an index names its class
    assert res.decider["positive"] == "negative"  # more than two classes: the first one, unless --positive
    for c in res.cases:
        assert sum(c["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert c["prediction"] == max(c["probabilities"], key=c["probabilities"].get)
    assert [len(c["counterfactuals"]) for c in res.cases] == [1, 1, 0]
    assert res.invariance[0]["n_cases"] == 2
