"""Serving only the surviving experts gives the same tokens and logprobs as the masked full model,
pruned at load time (`--prune`) or offline (`python -m easyep_sglang.prune`).

fp32 tiny models, and the FP8 one in DeepSeek-R1's layout (bf16 activations), greedy decoding, SGLang on the CPU. The masks (tests/server_pool.py) cover uniform and
per-layer-varying counts, whole groups and split groups. A checkpoint the pruner marks exact for stock
engines is served with no plugin at all; the others through the plugin, in the source routing space.
"""

import json

import pytest

from conftest import generate, greedy
from expert_distribution import record_expert_counts
from easyep_sglang.core.spec import spec_from_model_path
from server_specs import MASKS

PROMPTS = ["Q: 37+48=? A:", "def add(a, b):\n    return", "The license grants you"]
LOGPROB_TOL = 1e-5  # also for the FP8 model: the same kernels over the same experts, in the same order
STOCK_ENGINE = {  # mask -> the pruner's verdict for stock engines
    "deepseek_v3/whole": "exact",  # whole groups, the same count in every layer
    "deepseek_v3/varying": "plugin-only",  # counts differ per layer
    "qwen3_moe/varying": "plugin-only",
    "deepseek_v3_fp8/varying": "plugin-only",  # DeepSeek-R1's FP8 layout, bf16 activations (test_fp8.py)
}
MASKED, PRUNED, OFFLINE = "mask:{mask}", "prune:{mask}", "offline:{mask}"


@pytest.fixture(scope="module", params=sorted(STOCK_ENGINE))
def mask(request):
    return request.param


@pytest.fixture(scope="module")
def keep(mask):
    return MASKS[mask]


def _outputs(servers, name, mask):
    server = servers.use(name.format(mask=mask))
    return server, greedy(server, PROMPTS)


def _assert_same_outputs(reference, candidate):
    for ref, got in zip(reference, candidate):
        assert got["token_ids"] == ref["token_ids"]
        worst = max(abs(a - b) for a, b in zip(ref["logprobs"], got["logprobs"]))
        assert worst <= LOGPROB_TOL, f"logprobs differ by {worst:.2e}"


@pytest.mark.servers(MASKED, PRUNED)
def test_load_time_pruning_matches_the_mask(servers, mask, keep):
    _, masked = _outputs(servers, MASKED, mask)
    pruned_server, pruned = _outputs(servers, PRUNED, mask)
    _assert_same_outputs(masked, pruned)
    log = (pruned_server.recorder_dir / "server.log").read_text()
    kept = sum(len(ids) for ids in keep.values())
    assert f"easyep: pruned at load time: {len(keep)} layers hold {kept}/" in log


@pytest.mark.servers(PRUNED)
def test_pruned_server_never_routes_to_pruned_experts(servers, mask, keep):
    server = servers.use(PRUNED.format(mask=mask))
    n_experts = spec_from_model_path(server.model_path).n_experts
    counts = record_expert_counts(server.base_url, server.recorder_dir,
                                  lambda: [generate(server, p, 60, temperature=1.0) for p in PROMPTS])
    for layer, kept in keep.items():
        pruned = sorted(set(range(n_experts)) - set(kept))
        assert counts[layer, pruned].sum() == 0 and counts[layer, kept].sum() > 0


@pytest.mark.servers(MASKED, OFFLINE)
def test_offline_pruned_checkpoint_matches_the_mask(servers, mask, keep):
    _, masked = _outputs(servers, MASKED, mask)
    server, pruned = _outputs(servers, OFFLINE, mask)  # the pool pruned it with easyep_sglang.checkpoint.prune.prune_checkpoint
    config = json.loads((server.model_path / "config.json").read_text())
    assert config["easyep"]["stock_engine"] == STOCK_ENGINE[mask]
    _assert_same_outputs(masked, pruned)
    log = (server.recorder_dir / "server.log").read_text()
    if STOCK_ENGINE[mask] == "exact":
        assert "easyep: mask on" not in log, "an exact checkpoint is served by stock SGLang, no plugin"
    else:
        kept = sum(len(ids) for ids in keep.values())
        assert f"easyep: checkpoint pruned offline: {len(keep)} layers hold {kept}/" in log


# SGLang's GPU default for DeepSeek, forced on here: the shared expert fused into the routed FusedMoE, chosen
# by the router as id E and loaded after the routed experts. Each fused server -> the unfused masked server it
# must match, the line its log must show (None: stock SGLang, no plugin), and an offline checkpoint's class.
FUSED = {
    "mask:deepseek_v3/varying+fusion": ("mask:deepseek_v3/varying", "easyep: mask on 2 layers, 18/32 experts kept", None),
    "prune:deepseek_v3/varying+fusion": ("mask:deepseek_v3/varying",
                                         "easyep: pruned at load time: 2 layers hold 18/32 experts", None),
    "offline:deepseek_v3/whole+fusion": ("mask:deepseek_v3/whole", None, "exact"),
    # groups split unevenly; the mask's only unfused server is the TP=2 one
    "offline:deepseek_v3/tp2+fusion": ("tp2:deepseek_v3/tp2", "easyep: checkpoint pruned offline: 2 layers hold 16/32",
                                       "approximate"),
    "offline:deepseek_v3/varying+fusion": ("mask:deepseek_v3/varying",
                                           "easyep: checkpoint pruned offline: 2 layers hold 18/32", "plugin-only"),
}


@pytest.mark.parametrize("fused, reference", [(name, ref) for name, (ref, _, _) in FUSED.items()])
@pytest.mark.servers("{reference}", "{fused}")
def test_shared_expert_fusion_matches_the_unfused_mask(servers, fused, reference):
    masked = greedy(servers.use(reference), PROMPTS)
    fused_server = servers.use(fused)
    _assert_same_outputs(masked, greedy(fused_server, PROMPTS))
    _, expected_line, stock_engine = FUSED[fused]
    if stock_engine:
        config = json.loads((fused_server.model_path / "config.json").read_text())
        assert config["easyep"]["stock_engine"] == stock_engine
    log = (fused_server.recorder_dir / "server.log").read_text()
    assert "Shared experts fusion optimization is disabled" not in log
    if expected_line is None:
        assert "easyep: mask on" not in log, "an exact checkpoint is served by stock SGLang, no plugin"
    else:
        assert expected_line in log
