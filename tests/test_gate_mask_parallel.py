"""The mask holds in every worker of a parallel server, on the CPU (gloo): TP=2 in one server, TP=2 across two
nodes (two launchers on loopback, SGLang's --nnodes 2, one core each), and two data-parallel replicas (--dp-size 2,
SGLang's DP controller).

The TP=2 servers also record calibration statistics; test_calibration_oracle.py checks them against transformers
with the same mask, so each starts once.
"""

import re

import pytest

from conftest import generate
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.eval.provenance import server_info
from expert_distribution import record_expert_counts
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.sglang_plugin.served_mask import REPORT_KEY
from server_specs import MASKS
from test_prune_served_mask import assert_workers_report

KEEP = MASKS["deepseek_v3/tp2"]
# server -> the (process title, world rank) of each worker it must report
SERVERS = {
    "tp2:deepseek_v3/tp2": [("sglang::scheduler_TP0", 0), ("sglang::scheduler_TP1", 1)],
    "nodes2:deepseek_v3/tp2": [("sglang::scheduler_TP0", 0), ("sglang::scheduler_TP1", 1)],
    "dp2:deepseek_v3/tp2": [("sglang::scheduler_DP0", 0), ("sglang::scheduler_DP1", 0)],  # a world per replica
}


@pytest.mark.parametrize("name", SERVERS)
@pytest.mark.servers("{name}")
def test_mask_holds_on_every_worker(servers, name):
    server = servers.use(name)
    spec = spec_from_model_path(server.model_path)

    def workload():
        for prompt in ("Q: 12+30=? A:", "import os\n", "Permission is hereby granted"):
            generate(server, prompt, max_new_tokens=80, temperature=1.0)

    replicas = 2 if name.startswith("dp2:") else 1
    counts = record_expert_counts(server.base_url, server.recorder_dir, workload, dp_size=replicas)  # [L, E]
    for layer, kept in KEEP.items():
        pruned = sorted(set(range(spec.n_experts)) - set(kept))
        assert counts[layer, pruned].sum() == 0
        assert counts[layer, kept].sum() > 2 // replicas * 200 * spec.top_k, "a TP rank counts each token, a replica its own"
    logs = [path.read_text() for path in sorted(server.recorder_dir.glob("server*.log"))]
    assert len(logs) == (2 if name.startswith("nodes2:") else 1)
    lines = [len(re.findall(r"easyep: mask on 2 layers, 16/32 experts kept", log)) for log in logs]
    assert sum(lines) == 2 and min(lines) >= 1, "one line per TP worker, on every node"


@pytest.mark.parametrize("name", SERVERS)
@pytest.mark.servers("{name}")
def test_every_worker_reports_the_mask_in_server_info(servers, model_store, name):
    """Across nodes, node 0's /server_info holds the report of the rank on node 1 (gathered over SGLang's world
    group); under the DP controller, every replica's."""
    server = servers.use(name)
    assert_workers_report(server, name, ExpertMask.load(model_store.mask("deepseek_v3/tp2")).digest(), KEEP, schedulers=2)
    workers = server_info(server.base_url)[REPORT_KEY]["workers"]
    assert sorted((w["worker"], w["rank"]) for w in workers) == SERVERS[name]
    if name.startswith("nodes2:"):
        node_pids = [set(node.pids()) for node in server.nodes]
        assert [w["pid"] in pids for w in sorted(workers, key=lambda w: w["rank"]) for pids in node_pids] == [
            True, False, False, True], "rank 0 runs on node 0, rank 1 on node 1"
