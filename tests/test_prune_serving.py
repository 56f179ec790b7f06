"""Serving only the surviving experts gives the same tokens and logprobs as the masked full model,
pruned at load time (`--prune`) or offline (`python -m easyep_sglang.prune`).

fp32 tiny models, greedy decoding, SGLang on the CPU. Masks cover uniform and per-layer-varying
counts, whole groups and split groups. A checkpoint the pruner marks exact for stock engines is
served with no plugin at all; the others through the plugin, in the source routing space.
"""

import json

import pytest

from conftest import generate
from easyep_sglang.mask import ExpertMask
from easyep_sglang.prune import prune_checkpoint
from easyep_sglang.sglang_plugin.expert_distribution import record_expert_counts
from easyep_sglang.spec import spec_from_model_path

PROMPTS = ["Q: 37+48=? A:", "def add(a, b):\n    return", "The license grants you"]
LOGPROB_TOL_FP32 = 1e-5

MASKS = {  # (arch, name) -> (keep, the pruner's stock_engine verdict)
    # DeepSeek tiny: 16 experts, groups of 4, top-4 of 2 groups.
    ("deepseek_v3", "uniform-whole-groups"): ({1: [0, 1, 2, 3, 8, 9, 10, 11], 2: [4, 5, 6, 7, 12, 13, 14, 15]}, "exact"),
    ("deepseek_v3", "varying-split-groups"): ({1: [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14], 2: [0, 1, 4, 5, 8, 12]},
                                              "plugin-only"),
    # Qwen3 tiny: 16 experts, top-4, softmax, no groups.
    ("qwen3_moe", "varying"): ({0: list(range(12)), 1: [1, 4, 6, 9, 11, 15], 2: list(range(3, 13))}, "plugin-only"),
}


@pytest.fixture(scope="module", params=sorted(MASKS), ids=lambda k: f"{k[0]}-{k[1]}")
def case(request, tiny_models_fp32, tmp_path_factory):
    arch, name = request.param
    model = tiny_models_fp32[arch]
    spec = spec_from_model_path(model)
    folder = tmp_path_factory.mktemp(f"prune-{arch}-{name}")
    keep, stock_engine = MASKS[arch, name]
    ExpertMask.for_spec(spec, keep, name).save(folder / "mask.json")
    return {"model": model, "mask": folder / "mask.json", "spec": spec, "keep": keep, "stock_engine": stock_engine,
            "folder": folder}


def _assert_same_outputs(reference, candidate):
    for ref, got in zip(reference, candidate):
        assert got["token_ids"] == ref["token_ids"]
        worst = max(abs(a - b) for a, b in zip(ref["logprobs"], got["logprobs"]))
        assert worst <= LOGPROB_TOL_FP32, f"logprobs differ by {worst:.2e}"


def test_load_time_pruning_matches_the_mask(servers, case):
    masked = [generate(servers.get(case["model"], case["mask"]), p) for p in PROMPTS]
    pruned_server = servers.get(case["model"], case["mask"], ("--prune",))
    pruned = [generate(pruned_server, p) for p in PROMPTS]
    _assert_same_outputs(masked, pruned)
    log = (pruned_server.recorder_dir / "server.log").read_text()
    kept = sum(len(ids) for ids in case["keep"].values())
    assert f"easyep: pruned at load time: {len(case['keep'])} layers hold {kept}/" in log


def test_pruned_server_never_routes_to_pruned_experts(servers, case):
    server = servers.get(case["model"], case["mask"], ("--prune",))
    counts = record_expert_counts(server.base_url, server.recorder_dir,
                                  lambda: [generate(server, p, 60, temperature=1.0) for p in PROMPTS])
    for layer, kept in case["keep"].items():
        pruned = sorted(set(range(case["spec"].n_experts)) - set(kept))
        assert counts[layer, pruned].sum() == 0 and counts[layer, kept].sum() > 0


def test_offline_pruned_checkpoint_matches_the_mask(servers, case):
    out = case["folder"] / "pruned"
    prune_checkpoint(case["model"], case["mask"], out)
    assert json.loads((out / "config.json").read_text())["easyep"]["stock_engine"] == case["stock_engine"]
    masked = [generate(servers.get(case["model"], case["mask"]), p) for p in PROMPTS]
    server = servers.get(out)
    _assert_same_outputs(masked, [generate(server, p) for p in PROMPTS])
    log = (server.recorder_dir / "server.log").read_text()
    if case["stock_engine"] == "exact":
        assert "easyep: mask on" not in log, "an exact checkpoint is served by stock SGLang, no plugin"
    else:
        kept = sum(len(ids) for ids in case["keep"].values())
        assert f"easyep: checkpoint pruned offline: {len(case['keep'])} layers hold {kept}/" in log
