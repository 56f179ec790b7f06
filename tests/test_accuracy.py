"""Accuracy harness: answer extraction, math-verify grading, and a live run against the served trained demo MoE."""

import json
from pathlib import Path

import pytest

from easyep_sglang.eval.accuracy import (BUNDLED_DATA, AccuracyConfig, build_parser, extract_answer, is_correct,
                                         load_problems, main)
from easyep_sglang.eval.provenance import read_rows

DEMO_SETS = Path(__file__).resolve().parent.parent / "easyep_sglang" / "data" / "demo_sets"


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{2} no, wait: \boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
    ("Q: 2+2=? A: 4\nQ: 37+48=? A: 85\nQ:", "85"),
    (r"A: 3 but boxed wins: \boxed{4}", "4"),
    ("no answer here", None),
    (r"\boxed{unclosed", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("completion, gold, correct", [
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{3}", "4", False),
    (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}", True),
    (r"\boxed{0.75}", r"\frac{3}{4}", True),
    ("Q: 37+48=? A: 85", "85", True),
    ("Q: 37+48=? A: 86", "85", False),
    ("I cannot tell", "85", False),
])
def test_math_verify_decides(completion, gold, correct):
    assert is_correct(extract_answer(completion), gold) is correct


def test_bundled_data_and_bad_rows(tmp_path):
    problems = load_problems(BUNDLED_DATA)
    assert len(problems) == 10 and all(is_correct(p.answer, p.answer) for p in problems)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl has no answer field .* its fields are \['problem'\]"):
        load_problems(bad)


def test_the_flags_map_onto_the_config_with_its_defaults():
    assert AccuracyConfig(**vars(build_parser().parse_args(["--base-url", "u", "--model", "m", "--out", "o"]))) \
        == AccuracyConfig("u", "m", "o")


def number(text: str | None) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


@pytest.mark.servers("plain:demo")
def test_live_run_on_the_trained_demo(servers, tmp_path):
    """The harness against a served model that knows its task: the trained demo MoE answers held-out sums. Every
    fifth gold answer is made wrong, so a grader that passes everything fails here; each sample's grade and the
    score are checked against the served answers compared as integers, without math-verify."""
    server = servers.use("plain:demo")
    data, out, n = tmp_path / "sums.jsonl", tmp_path / "report.jsonl", 2
    rows = [json.loads(line) for line in (DEMO_SETS / "math_eval.jsonl").read_text().splitlines()[:20]]
    wrong = set(range(4, 20, 5))
    for i in wrong:
        rows[i]["answer"] = str(int(rows[i]["answer"]) + 1000)  # the sums and differences here stay below 1000
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    main(["--base-url", server.base_url, "--model", str(server.model_path), "--data", str(data), "--out", str(out),
          "--n", str(n), "--api", "completions", "--prompt-suffix", "", "--stop", "\n", "--temperature", "0",
          "--max-tokens", "8", "--concurrency", "4", "--seed", "1", "--quiet"])
    [row] = read_rows(out)
    assert row["kind"] == "accuracy" and row["n"] == n and row["num_problems"] == 20 and row["errors"] == 0
    right = {i: [] for i in range(20)}  # problem -> the independent grade of each sample
    for i, (problem, gold) in enumerate(zip(row["problems"], rows)):
        assert problem["answer"] == gold["answer"] and len(problem["samples"]) == n  # n samples asked, and answered
        for s in problem["samples"]:
            assert s["finish_reason"] in ("length", "stop") and s["completion_tokens"] >= 1
            assert s["extracted"] == s["text_tail"].strip()  # the completion continues "A:" with the answer alone
            right[i].append(number(s["extracted"]) == int(gold["answer"]))
            assert s["correct"] is right[i][-1], (s, gold)
        assert problem["pass@1"] == sum(right[i]) / n
    assert row["pass@1"] == pytest.approx(sum(map(sum, right.values())) / (20 * n))
    assert not any(grade for i in wrong for grade in right[i])  # so the harness graded them all wrong
    honest = [grade for i in right if i not in wrong for grade in right[i]]
    assert sum(honest) >= 0.9 * len(honest), row["pass@1"]  # 200/200 in transformers; greedy through SGLang, bf16
    assert (row["sglang_version"], row["device"], row["served_model_path"]) == ("0.5.23", "cpu", str(server.model_path))
    for key in ("git_commit", "moe_kernel_path", "model_fingerprint", "mask_digest", "created", "data_sha256"):
        assert key in row, key
    json.dumps(row)  # one JSON line per run
