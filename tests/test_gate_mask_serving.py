"""The mask applied at gating time, on real SGLang servers started through our launcher.

SGLang's own expert-distribution recorder is the witness: it counts routing choices inside the
worker, independently of our plugin. The masks (tests/server_pool.py) keep a different count per layer;
DeepSeek's split its groups, and leave two groups of layer 2 a single expert each, unreachable.
"""

import re

import openai
import pytest

from conftest import ARCHS, generate, greedy
from expert_distribution import record_expert_counts
from easyep_sglang.core.spec import spec_from_model_path
from server_specs import MASKS

PROMPTS = ["Q: 37+48=? A:", "def add(a, b):\n    return", "The license grants you", "In the beginning there"]
PLAIN, ALL_KEEP, MASKED = "plain:{arch}/fp32", "mask:{arch}/all", "mask:{arch}/varying"


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def keep(arch):
    return {layer: list(ids) for layer, ids in MASKS[f"{arch}/varying"].items()}


@pytest.fixture(scope="module")
def spec(arch, tiny_models_fp32):
    return spec_from_model_path(tiny_models_fp32[arch])


def _sampled_workload(server):
    def run():
        for prompt in PROMPTS:
            generate(server, prompt, max_new_tokens=80, temperature=1.0)
    return run


def _use(servers, name, arch):
    return servers.use(name.format(arch=arch))


@pytest.mark.servers(PLAIN, ALL_KEEP)
def test_all_keep_mask_is_identical_to_no_mask(servers, arch):
    plain = greedy(_use(servers, PLAIN, arch), PROMPTS)
    all_keep = greedy(_use(servers, ALL_KEEP, arch), PROMPTS)
    assert [o["token_ids"] for o in all_keep] == [o["token_ids"] for o in plain]
    assert [o["logprobs"] for o in all_keep] == [o["logprobs"] for o in plain]


@pytest.mark.servers(MASKED)
def test_masked_experts_are_never_chosen(servers, arch, keep, spec):
    server = _use(servers, MASKED, arch)
    counts = record_expert_counts(server.base_url, server.recorder_dir, _sampled_workload(server))  # [L, E]
    tokens = None
    for layer, kept in keep.items():
        pruned = sorted(set(range(spec.n_experts)) - set(kept))
        assert counts[layer, pruned].sum() == 0, f"layer {layer}: pruned experts chosen {counts[layer].tolist()}"
        assert (counts[layer, kept] > 0).sum() >= spec.top_k, "kept experts must still be chosen"
        tokens = tokens or int(counts[layer].sum()) // spec.top_k
        assert counts[layer].sum() == tokens * spec.top_k
    assert tokens > 300, "the workload must route a few hundred tokens"
    log = (server.recorder_dir / "server.log").read_text()
    assert re.search(rf"easyep: mask on {len(keep)} layers", log)


@pytest.mark.servers(PLAIN)
def test_witness_sees_the_pruned_experts_without_the_mask(servers, arch, keep, spec):
    server = _use(servers, PLAIN, arch)
    counts = record_expert_counts(server.base_url, server.recorder_dir, _sampled_workload(server))
    for layer, kept in keep.items():
        pruned = sorted(set(range(spec.n_experts)) - set(kept))
        assert counts[layer, pruned].sum() > 0, "without a mask the same workload routes to these experts"
    assert "easyep: mask on" not in (server.recorder_dir / "server.log").read_text()


@pytest.mark.servers(PLAIN, MASKED)
def test_mask_changes_greedy_output(servers, arch):
    plain = greedy(_use(servers, PLAIN, arch), PROMPTS)
    masked = greedy(_use(servers, MASKED, arch), PROMPTS)
    assert [o["logprobs"] for o in masked] != [o["logprobs"] for o in plain]


@pytest.mark.servers(MASKED)
def test_openai_client_chat_and_completions(servers, arch):
    server = _use(servers, MASKED, arch)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    model = str(server.model_path)
    completion = client.completions.create(model=model, prompt="Q: 2+2=? A:", max_tokens=8, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 8
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
