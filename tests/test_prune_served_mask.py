"""The served mask: a client reads from SGLang's own GET /server_info which mask every worker applied (digest, layers,
kept count), for --mask, --prune and an offline-pruned checkpoint; report rows record it and refuse another mask.

Named to run just before test_prune_serving.py, the next user of these pool servers (the pool keeps a server alive
until its last use). TP=2, two nodes and DP=2: test_gate_mask_parallel.py.
"""

import json

import pytest

from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.eval import accuracy
from easyep_sglang.eval.provenance import ServedMaskMismatch, provenance, served_mask_facts, server_info
from easyep_sglang.sglang_plugin.served_mask import REPORT_KEY
from server_specs import MASKS, server_spec

MASK = "deepseek_v3/varying"  # per-layer counts differ, groups split: the offline checkpoint needs the plugin
MODES = {f"mask:{MASK}": "mask", f"prune:{MASK}": "prune", f"offline:{MASK}": "pruned-checkpoint"}


def assert_workers_report(server, name: str, digest: str, keep: dict, schedulers: int = 1) -> None:
    """Each of the `schedulers` of `server` reported `digest` on the layers of `keep`, and is one of its processes."""
    served = server_info(server.base_url)[REPORT_KEY]
    kept = sum(len(ids) for ids in keep.values())
    assert (served["mask_digest"], served["layers"], served["kept"]) == (digest, sorted(keep), kept), served
    workers = served["workers"]
    assert len({w["pid"] for w in workers}) == schedulers and {w["pid"] for w in workers} <= set(server.pids())
    pruned = sorted(keep) if served["mode"] != "mask" else []
    for worker in workers:
        assert worker["worker"].startswith("sglang::scheduler"), worker
        assert (worker["mask_digest"], worker["mask_layers"], worker["kept"]) == (digest, sorted(keep), kept), worker
        assert worker["pruned_layers"] == pruned and worker["unresolved"] == []
        assert worker["recorder"] == server_spec(name).record_stats


@pytest.mark.parametrize("name", MODES)
@pytest.mark.servers("{name}")
def test_server_info_shows_the_mask_every_worker_applied(servers, model_store, name):
    server = servers.use(name)
    digest = ExpertMask.load(model_store.mask(MASK)).digest()
    if name.startswith("offline:"):  # the checkpoint carries the digest of the mask it was pruned with
        assert json.loads((server.model_path / "config.json").read_text())["easyep"]["mask_digest"] == digest
    assert server_info(server.base_url)[REPORT_KEY]["mode"] == MODES[name]
    assert_workers_report(server, name, digest, MASKS[MASK])


@pytest.mark.servers(f"mask:{MASK}")
def test_rows_record_the_served_mask_and_refuse_another(servers, model_store, tmp_path):
    server = servers.use(f"mask:{MASK}")
    served_mask, other_mask = model_store.mask(MASK), model_store.mask("deepseek_v3/whole")
    row = provenance(server.base_url, mask_path=served_mask)
    assert row["served_mask_digest"] == row["mask_digest"] == ExpertMask.load(served_mask).digest()
    assert row["served_mask"]["workers"][0]["mask_layers"] == sorted(MASKS[MASK])
    with pytest.raises(ServedMaskMismatch, match=r"names mask .*whole.*serves mask sha256:\w+ \(mask, 18 experts "
                       r"kept in layers \[1, 2\]\); pass --mask with the mask file the server was started with"):
        provenance(server.base_url, mask_path=other_mask)
    with pytest.raises(ServedMaskMismatch, match="names no mask, but the server .* serves mask sha256:"):
        provenance(server.base_url)
    out = tmp_path / "accuracy.jsonl"  # the harness refuses before it samples, and writes no row
    with pytest.raises(SystemExit) as exit_info:
        accuracy.main(["--base-url", server.base_url, "--model", str(server.model_path), "--out", str(out),
                       "--mask", str(other_mask), "--n", "1", "--quiet"])
    assert exit_info.value.code == 2 and not out.exists()


def test_a_row_naming_a_mask_needs_a_server_that_reports_one(model_store):
    """A server that does not report (another engine, or SGLang without the launcher) cannot back a masked row;
    an unmasked row against it records that nothing was reported."""
    mask = model_store.mask(MASK)
    with pytest.raises(ServedMaskMismatch, match="does not report the mask it serves .*python -m easyep_sglang.launch"):
        served_mask_facts({"version": "0.5.23"}, "http://h:1", mask, None)
    assert served_mask_facts({"version": "0.5.23"}, "http://h:1", None, None)["served_mask"] is None
    full = {REPORT_KEY: {"mode": "full", "mask_digest": None, "layers": [], "kept": 0, "workers": []}}
    with pytest.raises(ServedMaskMismatch, match=r"serves every expert \(no mask\); drop --mask"):
        served_mask_facts(full, "http://h:1", mask, None)
