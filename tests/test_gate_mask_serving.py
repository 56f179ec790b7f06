"""The mask applied at gating time, on real SGLang servers started through our launcher.

SGLang's own expert-distribution recorder is the witness: it counts routing choices inside the
worker, independently of our plugin.
"""

import re

import openai
import pytest

from conftest import ARCHS, generate
from easyep_sglang.mask import ExpertMask
from easyep_sglang.sglang_plugin.expert_distribution import record_expert_counts
from easyep_sglang.spec import spec_from_model_path

PROMPTS = ["Q: 37+48=? A:", "def add(a, b):\n    return", "The license grants you", "In the beginning there"]

# DeepSeek tiny: 16 experts in 4 groups of 4, top-4 of 2 groups. Layer 1 keeps whole groups 0 and 2;
# layer 2 keeps 2 experts of every group (groups split). Qwen tiny: 16 experts, top-4, softmax.
REAL_MASKS = {
    "deepseek_v3": {1: [0, 1, 2, 3, 8, 9, 10, 11], 2: [0, 1, 4, 5, 8, 9, 12, 13]},
    "qwen3_moe": {0: [1, 3, 5, 7, 9, 11, 13, 15], 1: [0, 1, 2, 3, 4, 5, 6, 7], 2: [2, 3, 5, 8, 11, 12, 14, 15]},
}


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model(arch, tiny_models):
    return tiny_models[arch]


@pytest.fixture(scope="module")
def masks(arch, model, tmp_path_factory):
    spec = spec_from_model_path(model)
    folder = tmp_path_factory.mktemp(f"masks-{arch}")
    real = ExpertMask.for_spec(spec, REAL_MASKS[arch], "hand")
    assert real.resolve(spec).keys() == REAL_MASKS[arch].keys()
    all_keep = ExpertMask.for_spec(spec, {l: range(spec.n_experts) for l in spec.moe_layers}, "all-keep")
    real.save(folder / "real.json")
    all_keep.save(folder / "all_keep.json")
    return {"real": folder / "real.json", "all_keep": folder / "all_keep.json", "spec": spec}


def _greedy(server):
    return [generate(server, p) for p in PROMPTS]


def _sampled_workload(server):
    def run():
        for seed, prompt in enumerate(PROMPTS):
            generate(server, prompt, max_new_tokens=80, temperature=1.0)
    return run


def test_all_keep_mask_is_identical_to_no_mask(servers, model, masks):
    plain = _greedy(servers.get(model))
    all_keep = _greedy(servers.get(model, masks["all_keep"]))
    assert [o["token_ids"] for o in all_keep] == [o["token_ids"] for o in plain]
    assert [o["logprobs"] for o in all_keep] == [o["logprobs"] for o in plain]


def test_masked_experts_are_never_chosen(servers, model, masks, arch):
    spec = masks["spec"]
    server = servers.get(model, masks["real"])
    counts = record_expert_counts(server.base_url, server.recorder_dir, _sampled_workload(server))  # [L, E]
    tokens = None
    for layer, kept in REAL_MASKS[arch].items():
        pruned = sorted(set(range(spec.n_experts)) - set(kept))
        assert counts[layer, pruned].sum() == 0, f"layer {layer}: pruned experts chosen {counts[layer].tolist()}"
        assert (counts[layer, kept] > 0).sum() >= spec.top_k, "kept experts must still be chosen"
        tokens = tokens or int(counts[layer].sum()) // spec.top_k
        assert counts[layer].sum() == tokens * spec.top_k
    assert tokens > 300, "the workload must route a few hundred tokens"
    log = (server.recorder_dir / "server.log").read_text()
    assert re.search(rf"easyep: mask on {len(REAL_MASKS[arch])} layers", log)


def test_witness_sees_the_pruned_experts_without_the_mask(servers, model, arch, masks):
    server = servers.get(model)
    counts = record_expert_counts(server.base_url, server.recorder_dir, _sampled_workload(server))
    spec = masks["spec"]
    for layer, kept in REAL_MASKS[arch].items():
        pruned = sorted(set(range(spec.n_experts)) - set(kept))
        assert counts[layer, pruned].sum() > 0, "without a mask the same workload routes to these experts"
    assert "easyep: mask on" not in (server.recorder_dir / "server.log").read_text()


def test_mask_changes_greedy_output(servers, model, masks):
    plain = _greedy(servers.get(model))
    masked = _greedy(servers.get(model, masks["real"]))
    assert [o["logprobs"] for o in masked] != [o["logprobs"] for o in plain]


def test_openai_client_chat_and_completions(servers, model, masks):
    server = servers.get(model, masks["real"])
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    completion = client.completions.create(model=str(model), prompt="Q: 2+2=? A:", max_tokens=8, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 8
    chat = client.chat.completions.create(model=str(model), messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
