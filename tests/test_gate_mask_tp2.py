"""The mask holds in every tensor-parallel worker (TP=2 on the CPU, gloo)."""

import re

from conftest import generate
from easyep_sglang.mask import ExpertMask
from easyep_sglang.sglang_plugin.expert_distribution import record_expert_counts
from easyep_sglang.spec import spec_from_model_path

KEEP = {1: [0, 1, 2, 3, 8, 9, 10, 11], 2: [0, 1, 4, 5, 8, 9, 12, 13]}


def test_mask_holds_on_both_tp_ranks(servers, tiny_models, tmp_path):
    model = tiny_models["deepseek_v3"]
    spec = spec_from_model_path(model)
    ExpertMask.for_spec(spec, KEEP, "hand").save(tmp_path / "mask.json")
    server = servers.get(model, tmp_path / "mask.json", ("--tp-size", "2"))

    def workload():
        for prompt in ("Q: 12+30=? A:", "import os\n", "Permission is hereby granted"):
            generate(server, prompt, max_new_tokens=80, temperature=1.0)

    counts = record_expert_counts(server.base_url, server.recorder_dir, workload)  # [L, E], summed over 2 ranks
    for layer, kept in KEEP.items():
        pruned = sorted(set(range(spec.n_experts)) - set(kept))
        assert counts[layer, pruned].sum() == 0
        assert counts[layer, kept].sum() > 2 * 200 * spec.top_k
    log = (server.recorder_dir / "server.log").read_text()
    assert len(re.findall(r"easyep: mask on 2 layers, 16/32 experts kept", log)) == 2, "one line per TP worker"
