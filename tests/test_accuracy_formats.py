"""Every format easyep_sglang.core.datasets_io reads, in the problem/solution layout of AIME and HMMT, scores the same
pass@1 through the served demo MoE as today's {problem, answer} JSONL. This file sorts right after
test_accuracy.py, which uses the same pool server."""

import json
from pathlib import Path

import datasets
import pytest

from easyep_sglang.eval import accuracy
from easyep_sglang.eval.provenance import read_rows
from easyep_sglang.serving.calibrate import ServerClient, flush_prefix_cache
from test_data_formats import write_formats

DEMO_SETS = Path(__file__).resolve().parent.parent / "easyep_sglang" / "data" / "demo_sets"


@pytest.mark.servers("plain:demo")
def test_every_format_scores_the_same_pass_at_1(servers, tmp_path):
    """The held-out sums as today's {problem, answer} JSONL, and as {problem, solution: "... \\boxed{85}"} in every
    format (Parquet with integer answers): the same answers, graded the same, through the served demo MoE."""
    server = servers.use("plain:demo")
    rows = [json.loads(line) for line in (DEMO_SETS / "math_eval.jsonl").read_text().splitlines()[:8]]
    baseline = tmp_path / "sums.jsonl"
    baseline.write_text("".join(json.dumps(row) + "\n" for row in rows))
    solutions = [{"problem": row["problem"], "solution": f"Adding up gives \\boxed{{{row['answer']}}}."} for row in rows]
    cases = {"answer jsonl": (baseline, None), **{f"solution {name}": case for name, case in
                                                   write_formats(solutions, tmp_path / "solution").items()}}
    cases["answer parquet, integers"] = (tmp_path / "int.parquet", None)
    datasets.Dataset.from_list([{"problem": r["problem"], "answer": int(r["answer"])} for r in rows]).to_parquet(
        str(cases["answer parquet, integers"][0]))
    graded = {}
    for name, (path, split) in cases.items():
        flush_prefix_cache(ServerClient(server.base_url))  # every run from the same cache state: same greedy tokens
        out = tmp_path / "reports" / f"{len(graded)}.jsonl"
        accuracy.main(["--base-url", server.base_url, "--model", str(server.model_path), "--data", str(path),
                       "--out", str(out), "--n", "1", "--api", "completions", "--prompt-suffix", "", "--stop", "\n",
                       "--temperature", "0", "--max-tokens", "8", "--concurrency", "1", "--quiet",
                       *(["--split", split] if split else [])])
        [row] = read_rows(out)
        graded[name] = (row["pass@1"], [(p["answer"], [(s["extracted"], s["correct"]) for s in p["samples"]])
                                        for p in row["problems"]])
    assert graded["answer jsonl"][0] >= 0.8, graded["answer jsonl"]  # the demo MoE knows its sums
    for name, result in graded.items():
        assert result == graded["answer jsonl"], name
