"""Throughput sweep: a smoke-sized live sweep and its rows, table and plot; the plan of every mode with the
weight bytes it serves; what a pruned configuration's row records; the report over every mode."""

import shlex
import sys

import pytest

from bench.sweep.run import build_parser, main, prepare_server
from bench.sweep.plan import MODES, Launch, ServerConfig, SweepConfig, first_experts_mask, plan_configs
from bench.common.serving import RunningServer, server_pss_bytes
from easyep_sglang.checkpoint.pruned_checkpoint import read_pruned_checkpoint
from easyep_sglang.core.mask import ExpertMask, MaskError
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.eval.provenance import provenance, read_rows
from easyep_sglang.serving.server_process import free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROVENANCE = ("git_commit", "sglang_version", "device", "model", "model_fingerprint", "mask_digest", "experts",
              "mode", "input_len", "output_len", "concurrency", "moe_kernel_path", "server_pss_bytes",
              "memory_budget", "mem_fraction_static", "output_throughput", "created")


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models["deepseek_v3"]


def test_first_experts_mask_spreads_over_groups(tiny):
    spec = spec_from_model_path(tiny)  # 16 experts in 4 groups, routing picks 2 groups, top-4
    assert first_experts_mask(spec, 8).keep[1] == (0, 1, 4, 5, 8, 9, 12, 13)
    assert first_experts_mask(spec, 10).keep[1] == (0, 1, 2, 4, 5, 6, 8, 9, 12, 13)
    with pytest.raises(MaskError, match="keep more experts"):
        first_experts_mask(spec, 4)  # one per group: two groups hold 2 < top_k experts


def test_pruned_modes_prepare_or_skip_with_a_reason(tiny, tmp_path):
    """One right outcome each: prune_offline serves the pruner's checkpoint of exactly the mask's experts (no mask,
    no flags), prune_load the source with the mask and --prune (our launcher has the flag); a mask the pruner
    refuses is skipped with the pruner's command and its own error, and leaves no checkpoint."""
    spec = spec_from_model_path(tiny)
    mask, mask_path = first_experts_mask(spec, 8), tmp_path / "mask.json"
    mask.save(mask_path)
    offline, reason = prepare_server(ServerConfig("prune_offline", 8, mask_path, 0), tiny, tmp_path)
    assert (offline, reason) == (Launch(tmp_path / "pruned" / "mask"), None), reason
    pruned = read_pruned_checkpoint(offline.model_path)
    assert pruned.source_spec.fingerprint == spec.fingerprint and pruned.keep == mask.keep
    assert spec_from_model_path(offline.model_path).n_experts == 8
    at_load, reason = prepare_server(ServerConfig("prune_load", 8, mask_path, 0), tiny, tmp_path)
    assert (at_load, reason) == (Launch(tiny, mask_path, ("--prune",)), None)
    bad = tmp_path / "other-model.json"
    first_experts_mask(spec_from_model_path(tiny), 8).save(bad)
    bad.write_text(bad.read_text().replace('"n_experts": 16', '"n_experts": 32'))
    skipped, reason = prepare_server(ServerConfig("prune_offline", 8, bad, 0), tiny, tmp_path)
    command = shlex.join([sys.executable, "-m", "easyep_sglang.prune", "--model-path", str(tiny), "--mask", str(bad),
                          "--out", str(tmp_path / "pruned" / "other-model"), "--force"])
    assert skipped is None and reason.startswith(f"the offline pruner rejected it ({command}: exit 1: ")
    assert "mask was made for another model (n_experts 32, this model has 16)" in reason
    assert not (tmp_path / "pruned" / "other-model").exists()


def test_the_flags_map_onto_the_config_with_its_defaults():
    assert SweepConfig(**vars(build_parser().parse_args(["--bench-model", "tiny"]))) == SweepConfig(bench_model="tiny")
    with pytest.raises(ValueError, match="give one of --model-path and --bench-model"):
        SweepConfig()


def test_every_mode_is_planned_with_the_weight_bytes_it_serves(tiny, tmp_path):
    sweep = SweepConfig(model_path=tiny, experts=(8,), modes=MODES)
    configs = plan_configs(sweep, spec_from_model_path(tiny), tiny, tmp_path)
    assert [(c.mode, c.experts) for c in configs] == [("full", 16), *((mode, 8) for mode in MODES[1:])]
    full_bytes = sum(p.stat().st_size for p in tiny.glob("*.safetensors"))
    weights = {c.mode: c.weight_bytes for c in configs}
    assert full_bytes * 0.99 < weights["full"] == weights["masked"] < full_bytes  # masked: every expert loaded
    assert weights["prune_load"] == weights["prune_offline"] < weights["full"] * 0.9
    assert configs[0].mask_path is None and all(c.mask_path.name == "first-8.json" for c in configs[1:])


@pytest.mark.servers("plain:deepseek_v3/fp32")
def test_smoke_sweep_rows_table_and_plot(servers, tmp_path, capsys):
    """The smallest live sweep: one configuration, measured on a running server (--base-url). The pruned modes'
    plans are checked above, their rows' mask facts below, every mode's table row in
    test_report_renders_every_setting_and_mode, and the sweep's own server start in
    test_sweep_reports_a_server_that_cannot_start."""
    server = servers.use("plain:deepseek_v3/fp32")
    out, model = tmp_path / "sweep", server.model_path
    main(["--model-path", str(model), "--base-url", server.base_url, "--experts", "8", "--modes", "full",
          "--inputs", "16", "--outputs", "8", "--concurrency", "2", "--num-prompts", "4", "--out-dir", str(out)])
    [row] = read_rows(out / "sweep.jsonl")
    assert (row["mode"], row["experts"]) == ("full", 16)
    missing = [key for key in PROVENANCE if key not in row]
    assert not missing, missing
    assert (row["input_len"], row["output_len"], row["concurrency"], row["completed"]) == (16, 8, 2, 4)
    assert row["sglang_version"] == "0.5.23" and row["device"] == "cpu" and row["mask_digest"] is None
    assert row["moe_kernel_path"].startswith("cpu/torch-native select_experts")
    assert row["server_pss_bytes"] > 100e6 and row["output_throughput"] > 0 and row["server_cpu_s"] > 0
    assert row["server_args"] is None and row["memory_budget"] == "as started elsewhere"
    full_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    assert full_bytes * 0.99 < row["weight_bytes"] < full_bytes

    table = (out / "sweep.md").read_text()
    assert table == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "| full | 16 |" in table and "(1.00x, 1.00x/CPU-s)" in table and "Ratios to the full model" in table
    assert "16 in / 8 out" in table and "doubled" in table
    assert (out / "sweep.png").read_bytes().startswith(PNG_MAGIC)


def test_sweep_reports_a_server_that_cannot_start(tiny, tmp_path, capsys):
    """The sweep's own server start (LaunchedServer with the sweep's flags): the launcher refuses the flags, the
    configuration is skipped with the launcher's own error, the sweep goes on and says so in its report."""
    out = tmp_path / "sweep"
    main(["--model-path", str(tiny), "--modes", "full", "--experts", "8", "--server-args=--prune",
          "--inputs", "16", "--outputs", "8", "--out-dir", str(out)])
    assert not (out / "sweep.jsonl").exists()
    table = (out / "sweep.md").read_text()
    assert "full with 16 experts, round 0: the server did not start (server exited with 2 during startup" in table
    assert "easyep: error: --prune needs --mask" in table  # the launcher got the sweep's --server-args


def test_running_server_must_be_on_this_machine():
    with pytest.raises(ValueError, match="give a loopback URL with its port"):
        RunningServer("http://10.0.0.7:30000")
    with pytest.raises(ValueError, match="no process of this user listens on port"):
        RunningServer(f"http://127.0.0.1:{free_port()}")


@pytest.mark.servers("offline:deepseek_v3/whole")
def test_pruned_rows_record_the_mask(servers, model_store):
    """What a sweep row records of a masked or pruned configuration, against a served pruned checkpoint."""
    server = servers.use("offline:deepseek_v3/whole")
    mask, source = model_store.mask("deepseek_v3/whole"), model_store.model("deepseek_v3/fp32")  # it was pruned with
    row = provenance(server.base_url, mask_path=mask, model_path=source)
    assert row["mask_digest"] == ExpertMask.load(mask).digest() and row["mask_digest"].startswith("sha256:")
    assert row["experts_per_layer"] == {"min": 8, "max": 8, "mean": 8}
    assert row["served_model_path"] == str(server.model_path) and row["model"] == str(source)
    assert row["model_fingerprint"] == spec_from_model_path(source).fingerprint
    assert row["moe_kernel_path"].startswith("cpu/torch-native select_experts")


def test_pss_of_no_processes_is_zero():
    assert server_pss_bytes([]) == 0 and server_pss_bytes([2**22 + 12345]) == 0


def test_report_renders_every_setting_and_mode(tmp_path):
    from bench.sweep.report import write_report
    from easyep_sglang.eval.provenance import append_row

    base = {"kind": "throughput-sweep", "sweep_id": "s1", "model": "m", "sglang_version": "0.5.23", "device": "cpu",
            "moe_kernel_path": "k", "git_commit": "c", "concurrency": 32, "num_prompts": 64, "scale": 0.03,
            "memory_budget": "same-mem-fraction", "mem_fraction_static": 0.3, "server_pss_bytes": 2e9}
    throughput = {("full", 128): 100.0, ("masked", 64): 110.0, ("prune_offline", 64): 150.0}
    for (mode, experts), tps in throughput.items():
        for nominal_in, nominal_out in ((1024, 1024), (4096, 1024)):
            append_row(tmp_path / "sweep.jsonl", {**base, "mode": mode, "experts": experts, "output_throughput": tps,
                                                  "output_tokens_per_cpu_s": tps / 2 if mode == "full" else tps,
                                                  "nominal_input_len": nominal_in, "nominal_output_len": nominal_out,
                                                  "input_len": round(nominal_in * 0.03), "output_len": 31,
                                                  "max_total_num_tokens": 1000 if mode == "full" else 2000})
    table = write_report(tmp_path / "sweep.jsonl", skipped=["prune_load (64 experts): no --prune"]).read_text()
    assert "| 1K in / 1K out (31/31 tok) | 4K in / 1K out (123/31 tok) |" in table
    assert "| full | 128 | 2.00 | 1000 | 100.0 (1.00x, 1.00x/CPU-s) |" in table
    assert "| prune_offline | 64 | 2.00 | 2000 | 150.0 (1.50x, 3.00x/CPU-s) | 150.0 (1.50x, 3.00x/CPU-s) |" in table
    assert "- prune_load (64 experts): no --prune" in table
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG_MAGIC)


def test_rounds_pair_each_run_with_the_full_run_of_its_round(tmp_path):
    from bench.sweep.report import markdown_table

    base = {"kind": "throughput-sweep", "sweep_id": "s2", "model": "m", "sglang_version": "0.5.23", "device": "cpu",
            "moe_kernel_path": "k", "git_commit": "c", "concurrency": 32, "num_prompts": 64, "scale": 0.03,
            "memory_budget": "fixed-kv-tokens", "mem_fraction_static": 0.3, "nominal_input_len": 1024,
            "nominal_output_len": 1024, "input_len": 31, "output_len": 31, "max_total_num_tokens": 8192}
    # round 0 runs on a quiet host, round 1 on a busy one: the pairwise ratios are 1.1 and 0.9.
    runs = [(0, "full", 128, 200.0, 4e9, 2e9), (0, "prune_load", 64, 220.0, 3e9, 1e9),
            (1, "full", 128, 100.0, 4e9, 2e9), (1, "prune_load", 64, 90.0, 3e9, 1e9)]
    rows = [{**base, "round": r, "mode": mode, "experts": experts, "output_throughput": tps,
             "output_tokens_per_cpu_s": tps, "server_pss_bytes": pss, "weight_bytes": weights}
            for r, mode, experts, tps, pss, weights in runs]
    table = markdown_table(rows)
    assert "| prune_load | 64 | 3.00 | 8192 | 155.0 (1.00x, 1.00x/CPU-s) |" in table
    assert "| prune_load | 64 | 1.000 | 1.000 | 0.750 | 0.500 | 1.000 |" in table
    assert "2 round(s)" in table


def test_report_of_servers_on_another_machine_has_no_memory_figures(tmp_path):
    """A --base-url server on another host has no PSS here: the table says so instead of failing."""
    from bench.sweep.report import markdown_table

    base = {"kind": "throughput-sweep", "sweep_id": "s3", "model": "m", "sglang_version": "0.5.23", "device": "cuda",
            "moe_kernel_path": "k", "git_commit": "c", "concurrency": 32, "num_prompts": 64, "scale": 1,
            "memory_budget": "as started elsewhere", "mem_fraction_static": None, "nominal_input_len": 1024,
            "nominal_output_len": 1024, "input_len": 1024, "output_len": 1024, "max_total_num_tokens": 8192,
            "server_pss_bytes": None, "output_tokens_per_cpu_s": None, "weight_bytes": None}
    rows = [{**base, "mode": "full", "experts": 256, "output_throughput": 100.0},
            {**base, "mode": "prune_offline", "experts": 128, "output_throughput": 130.0}]
    table = markdown_table(rows)
    assert "| full | 256 | — | 8192 | 100.0 (1.00x) |" in table
    assert "| prune_offline | 128 | 1.300 | — | — | — | — |" in table
