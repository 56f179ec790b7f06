"""The miniature reproduction's pure parts: overlaps, the loss helper's math, the plan, and the report.
No server starts here; the end-to-end run is `python -m bench.reproduce --quick` (see bench/reproduce/run.py)."""

import json
from pathlib import Path

import pytest
import torch

from bench.reproduce.plan import Config, ReproduceConfig, plan
from bench.reproduce.evaluate import Scored, answer_continuation, answer_items, mean_nll, nll_sum, text_items
from bench.reproduce.figures import domain_overlap, overlap, sample_overlap, top_sets
from bench.reproduce.report import markdown, write_report
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.demo.tiny_models import create_tokenizer
from easyep_sglang.eval.accuracy import Problem
from easyep_sglang.eval.provenance import append_row

# The trained demo's shape: 5 layers (the first dense), 32 routed experts, top-4, 4 groups choose 2.
DEMO_CONFIG = {"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 256, "num_hidden_layers": 5,
               "vocab_size": 100, "intermediate_size": 512, "n_routed_experts": 32, "num_experts_per_tok": 4,
               "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 4, "topk_group": 2,
               "topk_method": "noaux_tc", "moe_intermediate_size": 64, "n_shared_experts": 1}


def test_overlaps():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)  # [L=2, E=4]
    assert top_sets(scores, 2) == [frozenset({0, 2}), frozenset({2, 3})]  # tie 0.5/0.5: the lower id
    assert overlap({1, 2}, {2, 3}) == 0.5 and overlap({1}, {1}) == 1.0 and overlap(set(), set()) == 1.0
    other = torch.tensor([[0.9, 0.8, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    per_layer, mean = domain_overlap({"a": scores, "b": other}, 2)
    assert per_layer == [[[1.0, 0.5], [0.5, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]
    assert mean == [[1.0, 0.75], [0.75, 1.0]]
    selected = {1: {3: [0, 1], 4: [4, 5]}, 5: {3: [0, 2], 4: [4, 5]}, 25: {3: [0, 2], 4: [5, 6]}}
    assert sample_overlap(selected, 25) == {1: [0.5, 0.5], 5: [1.0, 0.5], 25: [1.0, 1.0]}


def test_loss_math_on_a_fake_generate_response():
    # SGLang's /generate with return_logprob: [logprob, token_id, text] per input token, the first logprob None.
    response = {"meta_info": {"input_token_logprobs": [[None, 1, None], [-0.5, 40, None], [-1.5, 41, None],
                                                       [-2.0, 42, None]]}}
    assert nll_sum([None, -0.5, -1.5, -2.0], 1) == (4.0, 3)
    assert nll_sum([None, -0.5, -1.5, -2.0], 3) == (2.0, 1)
    assert mean_nll([response], [Scored((1, 40, 41, 42), 1)]) == pytest.approx(4.0 / 3)
    assert mean_nll([response], [Scored((1, 40, 41, 42), 2)]) == pytest.approx(3.5 / 2)  # answer: the last two
    # Token-weighted over a set: (4.0 + 1.0) / (3 + 1).
    short = {"meta_info": {"input_token_logprobs": [[None, 1, None], [-1.0, 40, None]]}}
    assert mean_nll([response, short], [Scored((1, 40, 41, 42), 1), Scored((1, 40), 1)]) == pytest.approx(5.0 / 4)
    with pytest.raises(RuntimeError, match="3 input logprobs for 4 tokens"):
        mean_nll([{"meta_info": {"input_token_logprobs": [[None, 1, None]] * 3}}], [Scored((1, 2, 3, 4), 1)])


def test_answer_and_text_items_score_the_right_tokens():
    tokenizer = create_tokenizer()  # one token per character, BOS first
    assert answer_continuation("Q: 37+48=? A:", "85") == " 85" and answer_continuation("A: ", "85") == "85"
    [item] = answer_items(tokenizer, [Problem("Q: 37+48=? A:", "85")])
    assert tokenizer.decode(item.token_ids[item.start:]) == " 85"
    assert tokenizer.decode(item.token_ids, skip_special_tokens=True) == "Q: 37+48=? A: 85"
    items = text_items(tokenizer, ["def f():\n    return 1", "", "x" * 50], max_tokens=10)
    assert [len(i.token_ids) for i in items] == [10, 10] and all(i.start == 1 for i in items)  # "" is BOS only: dropped


def test_plan_counts_servers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEMO_CONFIG))
    spec = spec_from_model_path(tmp_path)
    repro = ReproduceConfig(prune_ratios=(0.5, 0.75), methods=("easy_ep", "easy_ep_no_token", "easy_ep_no_norm",
                                                               "gating", "frequency", "random"),
                            random_seeds=3, mixed_methods=("easy_ep",))
    configs = plan(repro, spec)
    assert len(configs) == 1 + 2 * (5 + 3 + 1) + 2 + 2 == 23
    assert len({c.name for c in configs}) == len(configs)
    by_name = {c.name: c for c in configs}
    assert by_name["easy_ep-math-keep16-s0"].tables == ("table2", "table1", "budget")
    assert by_name["easy_ep-math-keep8-s0"].tables == ("table2", "budget")
    assert by_name["easy_ep-mixed-keep16"].calibration == ("math", "code", "prose")
    assert by_name["easy_ep-math-budget32"] == Config("easy_ep-math-budget32", "easy_ep", ("math",), None, 32, 0, 0.75,
                                                      ("budget",))
    assert by_name["easy_ep-code-keep16"].tables == ("table1",)


def eval_row(config, method, calibration, keep, em, losses, tables, seed=0, scheme="uniform", budget=None,
             counts=(16, 16, 16, 16), ratio=0.5):
    return {"kind": "reproduce-eval", "run_id": "r1", "config": config, "method": method, "calibration": calibration,
            "scheme": scheme, "keep": keep, "budget": budget, "seed": seed, "prune_ratio": ratio, "tables": tables,
            "experts_per_layer": list(counts), "mask_digest": config, "exact_match": em, "answer_loss": losses[0],
            "loss": dict(zip(("math", "code", "prose"), losses[1:])), "model": "m", "git_commit": "abc",
            "eval": {"num_problems": 200, "num_texts": 40, "max_text_tokens": 256, "max_answer_tokens": 8}}


ROWS = [
    eval_row("full", "full", None, None, 0.40, (1.0, 2.0, 3.0, 4.0), ["table2", "table1", "budget"],
             scheme="full", counts=(32,) * 4, ratio=0.0),
    eval_row("easy_ep-math-keep16-s0", "easy_ep", "math", 16, 0.38, (1.1, 2.0, 3.3, 4.4), ["table2", "table1", "budget"]),
    eval_row("random-math-keep16-s0", "random", "math", 16, 0.10, (2.0, 3.0, 4.0, 5.0), ["table2"]),
    eval_row("random-math-keep16-s1", "random", "math", 16, 0.20, (2.0, 3.0, 4.0, 5.0), ["table2"], seed=1),
    eval_row("easy_ep-code-keep16", "easy_ep", "code", 16, 0.05, (3.0, 4.0, 3.0, 4.2), ["table1"]),
    eval_row("easy_ep-math-budget64", "easy_ep", "math", None, 0.39, (1.05, 2.0, 3.2, 4.3), ["budget"],
             scheme="budget", budget=64, counts=(10, 20, 20, 14)),
    {"kind": "reproduce-overlap", "run_id": "r1", "figure": "domains", "m": 16, "n_experts": 32, "layers": [1, 2],
     "domains": ["math", "code"], "per_layer": [[[1, 0.25], [0.25, 1]], [[1, 0.75], [0.75, 1]]],
     "mean": [[1.0, 0.5], [0.5, 1.0]]},
    {"kind": "reproduce-overlap", "run_id": "r1", "figure": "samples", "domain": "math", "m": 16, "n_experts": 32,
     "layers": [1, 2], "samples": [1, 5, 25], "per_layer": [[0.5, 0.7], [0.9, 0.9], [1, 1]], "overlap_mean": [0.6, 0.9, 1.0]},
    {"kind": "reproduce-invocation", "run_id": "r1", "command": ["python", "-m", "bench.reproduce", "--quick"],
     "duration_s": 404.2, "finished": "2026-11-24T05:00:00+00:00"},
]


def test_tables_from_hand_made_rows():
    text = markdown(ROWS)
    lines = text.splitlines()
    assert "| full | — | 32 | 0% | 40.0% | 1.0000 | 2.000 | 3.000 | 4.000 |" in lines
    assert "| easy_ep | math | 16 | 50% | 38.0% (95% of full) | 1.1000 (+10.0%) | 2.000 (+0.0%) | 3.300 (+10.0%) | " \
           "4.400 (+10.0%) |" in lines
    random_row = next(l for l in lines if l.startswith("| random (mean of 2 seeds)"))
    assert "15.0% ±7.1 (38% of full)" in random_row and "2.0000 ±0.0000 (+100.0%)" in random_row
    assert "| code | 16 | 5.0% (12% of full) | 4.000 (+100.0%) | **3.000 (+0.0%)** | 4.200 (+5.0%) |" in lines
    assert "| 50% | budget | 10/20/20/14 (64) | 39.0% (98% of full) | 1.0500 (+5.0%) | 2.000 (+0.0%) | 3.200 (+6.7%) | " \
           "4.300 (+7.5%) |" in lines
    budget = [l for l in lines if l.startswith("| 50% |")]
    assert budget[0].startswith("| 50% | uniform | 16/16/16/16 (64)") and len(budget) == 2
    assert "| code | 0.50 | 1.00 |" in lines and "| math | 16 | 0.60 | 0.90 | 1.00 |" in lines
    assert "- `python -m bench.reproduce --quick`: 404 s, finished 2026-11-24T05:00:00+00:00" in lines
    assert "| easy_ep-math-budget64 | easy_ep-math-budget64 | easy_ep-math-budget64 | None | None | None |" in lines


def test_a_loss_near_zero_gets_an_absolute_change():
    from bench.reproduce.report import aggregate, fmt

    full = aggregate([eval_row("full", "full", None, None, 1.0, (0.0004, 0.6, 1.4, 1.5), [])])
    pruned = aggregate([eval_row("x", "easy_ep", "math", 16, 0.7, (0.7744, 0.72, 1.5, 1.6), [])])
    assert fmt(pruned, "answer_loss", full) == "0.7744 (+0.7740)"
    assert fmt(pruned, "loss_math", full) == "0.720 (+20.0%)"
    assert fmt(pruned, "exact_match", full) == "70.0% (70% of full)"


def test_write_report_renders_files(tmp_path):
    rows_path = tmp_path / "rows.jsonl"
    for row in ROWS:
        append_row(rows_path, row)
    md = write_report(rows_path)
    assert md.read_text().startswith("# Miniature EASY-EP reproduction, run r1")
    for name in ("fig2_domain_overlap.png", "fig3_sample_overlap.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class FakeServer:
    events: list = []

    def __init__(self, model_path, mask=None, **kwargs):
        self.mask, self.base_url = mask, f"fake://{mask}"

    def start(self):
        FakeServer.events.append(("start", self.mask))
        if str(self.mask) == "broken":
            raise RuntimeError("server exited")

    def stop(self):
        FakeServer.events.append(("stop", self.mask))


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_serve_in_turn_stops_every_server(monkeypatch, tmp_path, ahead):
    import bench.reproduce.evaluate as reproduce_eval

    monkeypatch.setattr(reproduce_eval, "LaunchedServer", FakeServer)
    a, b, c, broken = (Path(name) for name in ("a", "b", "c", "broken"))
    FakeServer.events = []
    for mask, server, _ in reproduce_eval.serve_in_turn(tmp_path, [None, a, b], [], {}, tmp_path, ahead):
        FakeServer.events.append(("use", mask))
    assert [e for e in FakeServer.events if e[0] == "use"] == [("use", None), ("use", a), ("use", b)]
    assert [m for kind, m in FakeServer.events if kind == "start"] == [None, a, b]
    assert sorted(str(m) for kind, m in FakeServer.events if kind == "stop") == ["None", "a", "b"]
    for mask in (None, a, b):  # each server is used only after it started and stopped after use
        assert FakeServer.events.index(("start", mask)) < FakeServer.events.index(("use", mask)) \
            < FakeServer.events.index(("stop", mask))
    if not ahead:  # strictly one at a time
        assert FakeServer.events.index(("stop", None)) < FakeServer.events.index(("start", a))
    # A failure while measuring stops the current server and the one started ahead.
    FakeServer.events = []
    with pytest.raises(ValueError):
        for mask, server, _ in reproduce_eval.serve_in_turn(tmp_path, [a, b, c], [], {}, tmp_path, ahead):
            raise ValueError("measurement failed")
    started = {m for kind, m in FakeServer.events if kind == "start"}
    assert started == [{a}, {a, b}, {a, b, c}][ahead]
    assert {m for kind, m in FakeServer.events if kind == "stop"} == started
    # A server that cannot start is stopped, and the error reaches the caller.
    FakeServer.events = []
    with pytest.raises(RuntimeError, match="server exited"):
        list(reproduce_eval.serve_in_turn(tmp_path, [broken], [], {}, tmp_path, ahead))
    assert FakeServer.events == [("start", broken), ("stop", broken)]


def test_accuracy_harness_completions_api_reads_the_answer_from_prompt_plus_completion():
    from types import SimpleNamespace

    from easyep_sglang.eval.accuracy import AccuracyConfig, sample

    calls = []

    def create(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(choices=[SimpleNamespace(text=" 85", finish_reason="stop")],
                               usage=SimpleNamespace(completion_tokens=3))

    client = SimpleNamespace(completions=SimpleNamespace(create=create))
    config = AccuracyConfig("u", "m", "o", api="completions", stop=["\n"], prompt_suffix="", temperature=0.0,
                            max_tokens=8)
    result = sample(client, config, Problem("Q: 37+48=? A:", "85"), seed=0)
    assert result["extracted"] == "85" and result["text_tail"] == " 85"
    assert calls == [dict(model="m", prompt="Q: 37+48=? A:", temperature=0.0, top_p=0.95, max_tokens=8, seed=0,
                          stop=["\n"])]
