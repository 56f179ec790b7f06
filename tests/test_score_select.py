"""Scorers, mixing, selection, repair, ExpertStats I/O and the select CLI, on hand-made numbers."""

import json
import random

import pytest
import torch

from easyep_sglang.core.mask import ExpertMask, MaskError
from easyep_sglang.core.score import (
                                      keep_for_ratio, mix_domains, repair_groups, score, select_budget, select_layer, select_uniform,
                                      )
from easyep_sglang.core.selection import SelectionConfig, build_parser, main
from easyep_sglang.core.spec import spec_from_config
from easyep_sglang.core.stats import ExpertStats

SHAPE = {"hidden_size": 16, "vocab_size": 32, "intermediate_size": 32, "moe_intermediate_size": 8}


def qwen_config(**overrides):  # MoE layers 0, 1; 4 experts, top-2, no groups
    return {"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2, "num_experts": 4,
            "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [], **SHAPE, **overrides}


def deepseek_config(**overrides):  # MoE layers 1, 2; 8 experts in 4 groups of 2, topk_group 2, top-3
    return {"architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 3, "n_routed_experts": 8,
            "num_experts_per_tok": 3, "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_shared_experts": 1, **SHAPE, **overrides}


# groups {0,1} {2,3} {4,5} {6,7}; plain top-4 = {0,2,4,6} puts one expert in every group
R = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.05]


def hand_stats():
    """Layer 7 (row 1) sees two tokens and one padded row; layer 5 sees nothing."""
    stats = ExpertStats.zeros([5, 7], 4)
    stats.update(
        stats.index_of(7),
        torch.tensor([[0, 1], [1, 2], [-1, -1]], dtype=torch.int32),
        torch.tensor([[0.5, 0.25], [1.0, 2.0], [9.0, 9.0]]),
        torch.tensor([[2.0, 4.0], [1.0, 3.0], [9.0, 9.0]]),
        torch.tensor([0.5, 1.0, 9.0]),
    )
    return stats


@pytest.mark.parametrize("method, row", [
    ("frequency", [1, 2, 1, 0]),
    ("gating", [0.5, 1.25, 2.0, 0]),  # g
    ("easy_ep", [0.5, 1.5, 6.0, 0]),  # g * ||e|| * s
    ("easy_ep_no_token", [1.0, 2.0, 6.0, 0]),  # g * ||e||
    ("easy_ep_no_norm", [0.25, 1.125, 2.0, 0]),  # g * s
])
def test_scorer_formulas(method, row):
    scores = score(hand_stats(), method)
    assert scores.dtype == torch.float64
    assert scores.tolist() == [[0, 0, 0, 0], row]


def test_update_accumulates_and_counts_real_tokens():
    stats = hand_stats()
    stats.update(1, torch.tensor([[3, 0]]), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), torch.zeros(1))
    assert stats.tokens.tolist() == [0, 3]
    assert stats.frequency.tolist()[1] == [2, 2, 1, 1]
    assert stats.easy_ep.tolist()[1] == [0.5, 1.5, 6.0, 0]  # s = 0 adds nothing
    with pytest.raises(ValueError, match=r"layer 3 is not among the recorded MoE layers \[5, 7\]"):
        stats.index_of(3)


def test_random_is_seeded_and_ignores_values():
    first = score(hand_stats(), "random", seed=3)
    assert first.shape == (2, 4) and ((first >= 0) & (first < 1)).all()
    assert torch.equal(first, score(ExpertStats.zeros([5, 7], 4), "random", seed=3))
    assert not torch.equal(first, score(hand_stats(), "random", seed=4))


def test_unknown_method_lists_supported():
    with pytest.raises(ValueError, match="unknown method 'reap'; supported: easy_ep, easy_ep_no_token, .*random"):
        score(hand_stats(), "reap")


def test_mix_domains_normalises_each_layer_then_weights():
    a = torch.tensor([[1.0, 3, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 2, 4, 0], [1, 1, 1, 1]], dtype=torch.float64)
    assert mix_domains([a, b], [2, 1]).tolist() == [[0.75, 1.75, 0.5, 0], [0.25, 0.25, 0.25, 0.25]]
    assert mix_domains([a, b]).tolist() == [[0.5, 1.0, 0.5, 0], [0.25, 0.25, 0.25, 0.25]]
    with pytest.raises(ValueError, match="2 domain weights for 1 domains"):
        mix_domains([a], [1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        mix_domains([a, b], [1, -1])
    with pytest.raises(ValueError, match="different shapes"):
        mix_domains([a, b[:1]])
    with pytest.raises(ValueError, match="non-negative"):
        mix_domains([-a, b])


def test_select_uniform_and_tie_break_by_expert_id():
    spec = spec_from_config(qwen_config())
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2], [5, 1, 5, 0]], dtype=torch.float64)
    assert select_uniform(scores, spec, 2) == {0: [1, 2], 1: [0, 2]}
    assert select_uniform(scores, spec, 3) == {0: [1, 2, 3], 1: [0, 1, 2]}
    ties = torch.tensor([[1.0, 2, 2, 2], [0, 0, 0, 0]], dtype=torch.float64)
    assert select_uniform(ties, spec, 2) == {0: [1, 2], 1: [0, 1]}


def test_keep_ratio_rounds_half_up():
    spec = spec_from_config(qwen_config())
    assert [keep_for_ratio(r, spec) for r in (0.5, 0.625, 0.75, 1.0)] == [2, 3, 3, 4]
    with pytest.raises(ValueError, match="keeps 1 of 4 experts < top_k=2; use a ratio of at least 0.5"):
        keep_for_ratio(0.3, spec)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        keep_for_ratio(1.5, spec)


def test_select_uniform_rejects_bad_keep_and_shape():
    spec = spec_from_config(qwen_config())
    scores = torch.ones(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="keep=1 < top_k=2"):
        select_uniform(scores, spec, 1)
    with pytest.raises(ValueError, match="keep=5 > n_experts=4"):
        select_uniform(scores, spec, 5)
    with pytest.raises(ValueError, match=r"scores are \[3, 4\] but Qwen3MoeForCausalLM has \[2, 4\]"):
        select_uniform(torch.ones(3, 4, dtype=torch.float64), spec, 2)


def test_budget_compares_layers_by_share_of_their_total():
    spec = spec_from_config(qwen_config(num_experts_per_tok=1))
    # shares: layer 0 [.6 .2 .1 .1], layer 1 [.3 .3 .2 .2]; floor 1 each = {0}, {0}; the next three
    # shares are .3 (1, e1), .2 (0, e1), .2 (1, e2) -- raw scores would give all three to layer 1
    scores = torch.tensor([[6.0, 2, 1, 1], [30, 30, 20, 20]], dtype=torch.float64)
    assert select_budget(scores, spec, 5) == {0: [0, 1], 1: [0, 1, 2]}
    assert select_budget(scores, spec, 2) == {0: [0], 1: [0]}
    assert select_budget(scores, spec, 8) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}


def test_budget_floor_keeps_top_k_of_a_silent_layer():
    spec = spec_from_config(qwen_config(num_experts_per_tok=1))
    scores = torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    assert select_budget(scores, spec, 4) == {0: [0], 1: [0, 1, 2]}
    with pytest.raises(ValueError, match=r"budget=1 must be between 2 \(top_k=1 in each of 2 MoE layers\) and 8"):
        select_budget(scores, spec, 1)
    with pytest.raises(ValueError, match="budget=9 must be between 2"):
        select_budget(scores, spec, 9)


def test_repair_when_plain_top_m_starves_a_group_choice():
    spec = spec_from_config(deepseek_config())
    with pytest.raises(MaskError, match="holding only 2 kept experts < top_k=3"):
        ExpertMask.for_spec(spec, {1: [0, 2, 4, 6]}, "plain").resolve(spec)
    # thinnest group, lowest sum: group 3 gives up e6 to the best pruned expert of a group of >= 1: e5
    assert select_layer(R, spec, 4) == [0, 2, 4, 5]
    ExpertMask.for_spec(spec, {1: [0, 2, 4, 5]}, "repaired").resolve(spec)


def test_repair_takes_two_moves_when_top_k_needs_two_full_groups():
    spec = spec_from_config(deepseek_config(num_experts_per_tok=4))
    # move 1 as above -> {0,2,4,5}: groups (1,1,2,0) reach 2 + 1 = 3 < 4; move 2: group 1 (sum .8 < .9)
    # gives e2 to group 0, the only group of >= 1 with room -> e1
    assert repair_groups([0, 2, 4, 6], R, spec) == [0, 1, 4, 5]
    # top-5 {0,2,4,5,6} = groups (1,1,2,1) reach 2 + 1 < 4; group 3 (sum .6) gives e6 to the best
    # pruned expert of groups 0 and 1: e3 (.2 > .1) -> groups (1,2,2,0) reach 2 + 2
    assert select_layer(R, spec, 5) == [0, 2, 3, 4, 5]


@pytest.mark.parametrize("top_k", [2, 3, 4])
def test_every_selection_serves_and_keeps_its_count(top_k):
    spec = spec_from_config(deepseek_config(num_experts_per_tok=top_k))
    rng = random.Random(top_k)
    for _ in range(100):
        scores = torch.tensor([[rng.choice([0.0, 0.5, rng.random()]) for _ in range(8)] for _ in range(2)])
        keep, budget = rng.randint(top_k, 8), rng.randint(2 * top_k, 16)
        uniform = select_uniform(scores.double(), spec, keep)
        varying = select_budget(scores.double(), spec, budget)
        assert [len(ids) for ids in uniform.values()] == [keep, keep]
        assert sum(len(ids) for ids in varying.values()) == budget
        for chosen in (uniform, varying):
            ExpertMask.for_spec(spec, chosen, "random").resolve(spec)



def test_multiple_of_moves_whole_chunks_and_keeps_groups_reachable():
    spec = spec_from_config(qwen_config(num_experts_per_tok=1))
    scores = torch.tensor([[6.0, 2, 1, 1], [30, 30, 20, 20]], dtype=torch.float64)  # as in the budget test
    assert select_budget(scores, spec, 6, multiple_of=2) == {0: [0, 1], 1: [0, 1, 2, 3]}  # .2 + .2 > .1 + .1
    with pytest.raises(ValueError, match="budget=5 is not a multiple of 2; use 4 or 6"):
        select_budget(scores, spec, 5, multiple_of=2)
    with pytest.raises(ValueError, match="keep=3 is not a multiple of 2; keep 2 or 4"):
        select_uniform(scores, spec, 3, multiple_of=2)
    assert keep_for_ratio(0.6, spec, multiple_of=2) == 2 and keep_for_ratio(1.0, spec, multiple_of=3) == 3
    spec = spec_from_config(deepseek_config())  # 4 groups of 2, top-3 of topk_group 2
    rng = random.Random(0)
    for _ in range(100):
        scores = torch.tensor([[rng.random() for _ in range(8)] for _ in range(2)], dtype=torch.float64)
        budget = rng.choice([8, 10, 12, 14, 16])
        varying = select_budget(scores, spec, budget, multiple_of=2)
        assert sum(map(len, varying.values())) == budget
        for chosen in (varying, select_uniform(scores, spec, 4, 2)):
            assert all(len(ids) % 2 == 0 for ids in chosen.values())
            ExpertMask.for_spec(spec, chosen, "random").resolve(spec)  # group reachability still holds
        assert select_budget(scores, spec, budget - 1, multiple_of=1) == select_budget(scores, spec, budget - 1)

def test_stats_merge_save_load_round_trip(tmp_path):
    spec = spec_from_config(qwen_config())
    merged = hand_stats().merge(hand_stats())
    assert merged.easy_ep.tolist()[1] == [1.0, 3.0, 12.0, 0] and merged.tokens.tolist() == [0, 4]
    path = tmp_path / "math.safetensors"
    merged.save(path, {"model": spec.identity(), "domain": "math", "samples": 25, "sglang_version": "0.5.23"})
    loaded, provenance = ExpertStats.load(path)
    assert loaded.layer_ids == (5, 7) and torch.equal(loaded.sums, merged.sums)
    assert torch.equal(loaded.tokens, merged.tokens)
    assert provenance["model"]["fingerprint"] == spec.fingerprint and provenance["domain"] == "math"
    assert provenance["samples"] == 25 and provenance["token_count"] == 4 and "created" in provenance
    assert "package_version" in provenance
    assert not list(tmp_path.glob(".*.tmp"))


def test_stats_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot merge statistics of layers \\[1\\]"):
        hand_stats().merge(ExpertStats.zeros([1], 4))
    with pytest.raises(ValueError, match="must name the model"):
        hand_stats().save(tmp_path / "s.safetensors", {"domain": "math"})
    with pytest.raises(FileNotFoundError, match="stats file .*nope.safetensors not found"):
        ExpertStats.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        ExpertStats.load(tmp_path / "junk.safetensors")


# ---- the CLI, end to end -------------------------------------------------------------------------
def model_dir(tmp_path, config):
    path = tmp_path / config["architectures"][0]
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_stats(path, config, statistic, rows, stats_config=None):
    spec = spec_from_config(config)
    stats = ExpertStats.zeros(spec)
    getattr(stats, statistic).copy_(torch.tensor(rows, dtype=torch.float64))
    stats.tokens.fill_(10)  # select refuses statistics without tokens
    stats.save(path, {"model": spec_from_config(stats_config or config).identity(), "domain": path.stem})
    return str(path)


def test_cli_deepseek_keep_repairs_and_records_provenance(tmp_path, capsys):
    config = deepseek_config()
    model, spec = model_dir(tmp_path, config), spec_from_config(config)
    stats = write_stats(tmp_path / "math.safetensors", config, "easy_ep", [R, list(range(8))])
    out = tmp_path / "mask.json"
    main(["--stats", stats, "--keep", "4", "--model-path", str(model), "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["keep"] == {"1": [0, 2, 4, 5], "2": [4, 5, 6, 7]}
    assert data["method"] == "easy_ep" and data["model"]["fingerprint"] == spec.fingerprint
    prov = data["provenance"]
    assert prov["stats"][0]["path"] == stats and prov["stats"][0]["provenance"]["domain"] == "math"
    assert prov["selection"] == {"keep": 4} and prov["seed"] == 0
    mask = ExpertMask.load(out)
    assert prov["mask_digest"] == mask.digest() and mask.resolve(spec)
    assert capsys.readouterr().out.startswith(f"easyep: wrote {out}: easy_ep over 1 stats file(s), mask on 2 of 2")
    main(["--stats", stats, "--keep-ratio", "0.5", "--model-path", str(model), "--out", str(out)])
    assert json.loads(out.read_text())["provenance"]["selection"] == {"keep_ratio": 0.5, "keep": 4}
    main(["--stats", stats, "--budget", "10", "--multiple-of", "2", "--model-path", str(model), "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["provenance"]["selection"] == {"budget": 10, "multiple_of": 2}
    assert sorted(len(ids) for ids in data["keep"].values()) == [4, 6]


def test_cli_qwen_mixes_weighted_domains(tmp_path):
    config = qwen_config()
    model, out = str(model_dir(tmp_path, config)), str(tmp_path / "mask.json")
    a = write_stats(tmp_path / "a.safetensors", config, "gate", [[4, 4, 0, 0], [1, 0, 0, 3]])
    b = write_stats(tmp_path / "b.safetensors", config, "gate", [[0, 0, 2, 6], [1, 1, 1, 1]])
    common = ["--stats", a, b, "--method", "gating", "--model-path", model, "--out", out]
    # 3a + b: layer 0 [1.5 1.5 .25 .75], layer 1 [1 .25 .25 2.5]; a + b: layer 0 [.5 .5 .25 .75]
    main(common + ["--domain-weights", "3,1", "--keep", "2"])
    assert json.loads(open(out).read())["keep"] == {"0": [0, 1], "1": [0, 3]}
    main(common + ["--keep", "2"])
    assert json.loads(open(out).read())["keep"] == {"0": [0, 3], "1": [0, 3]}
    # shares of 3a + b: layer 0 [.375 .375 .0625 .1875], layer 1 [.25 .0625 .0625 .625]; 1 place past top-2
    main(common + ["--domain-weights", "3,1", "--budget", "5"])
    data = json.loads(open(out).read())
    assert data["keep"] == {"0": [0, 1, 3], "1": [0, 3]} and data["provenance"]["domain_weights"] == [3.0, 1.0]


def test_the_flags_map_onto_the_config_with_its_defaults():
    argv = ["--stats", "a.safetensors", "--keep", "4", "--model-path", "m", "--out", "mask.json"]
    assert SelectionConfig(**vars(build_parser().parse_args(argv))) \
        == SelectionConfig(["a.safetensors"], "m", "mask.json", keep=4)
    with pytest.raises(ValueError, match="give exactly one of --keep, --keep-ratio and --budget"):
        SelectionConfig(("a.safetensors",), "m", "mask.json", keep=4, budget=8)


@pytest.mark.parametrize("args, message", [
    (["--keep", "1"], "keep=1 < top_k=2"),
    (["--keep", "5"], "keep=5 > n_experts=4"),
    (["--keep-ratio", "0.25"], "keeps 1 of 4 experts < top_k=2"),
    (["--budget", "9"], "budget=9 must be between 4"),
    (["--keep", "2", "--domain-weights", "1,1"], "2 weights for 1 --stats files; give one per file"),
    (["--keep", "2", "--method", "random", "--stats", "missing.safetensors"], "missing.safetensors not found"),
])
def test_cli_user_errors(tmp_path, args, message):
    config = qwen_config()
    model = str(model_dir(tmp_path, config))
    stats = write_stats(tmp_path / "a.safetensors", config, "gate", [[1, 2, 3, 4], [4, 3, 2, 1]])
    argv = ["--stats", stats, "--model-path", model, "--out", str(tmp_path / "m.json")] + args
    with pytest.raises(SystemExit, match=message):
        main(argv)
    assert not (tmp_path / "m.json").exists()


def test_cli_refuses_stats_of_another_model(tmp_path):
    config = qwen_config()
    model = str(model_dir(tmp_path, config))
    stats = write_stats(tmp_path / "a.safetensors", config, "gate", [[1, 2, 3, 4]] * 2, qwen_config(hidden_size=32))
    with pytest.raises(SystemExit, match="holds statistics for another model .* pass the --model-path"):
        main(["--stats", stats, "--keep", "2", "--model-path", model, "--out", str(tmp_path / "m.json")])
    with pytest.raises(SystemExit, match="config.json not found"):
        main(["--stats", stats, "--keep", "2", "--model-path", str(tmp_path), "--out", str(tmp_path / "m.json")])
