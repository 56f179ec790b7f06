"""The mask holds in every tensor-parallel worker (TP=2 on the CPU, gloo).

The TP=2 server also records calibration statistics; test_calibration_oracle.py checks them against
transformers with the same mask, so the slowest server of the suite starts once.
"""

import re

import pytest

from conftest import generate
from easyep_sglang.mask import ExpertMask
from easyep_sglang.report import server_info
from easyep_sglang.sglang_plugin.expert_distribution import record_expert_counts
from easyep_sglang.sglang_plugin.served_mask import REPORT_KEY
from easyep_sglang.spec import spec_from_model_path
from server_pool import MASKS
from test_prune_served_mask import assert_workers_report

TP2 = "tp2:deepseek_v3/tp2"
KEEP = MASKS["deepseek_v3/tp2"]


@pytest.mark.servers(TP2)
def test_mask_holds_on_both_tp_ranks(servers):
    server = servers.use(TP2)
    spec = spec_from_model_path(server.model_path)

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


@pytest.mark.servers(TP2)
def test_both_tp_ranks_report_the_mask_in_server_info(servers, model_store):
    server = servers.use(TP2)
    assert_workers_report(server, TP2, ExpertMask.load(model_store.mask("deepseek_v3/tp2")).digest(), KEEP, tp_size=2)
    workers = server_info(server.base_url)[REPORT_KEY]["workers"]
    assert len({w["worker"] for w in workers}) == 2, "one report per TP rank"
