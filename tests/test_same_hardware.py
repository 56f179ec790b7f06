"""bench.sweep --same-hardware: each configuration in the smallest shape that fits the devices, replicas as SGLang
--dp-size, the shapes really served as planned (KV tokens, one core per rank); several --base-url replicas; the
report's speedup with its spread over rounds and its parts."""

import re

import pytest

from bench.sweep.same_hardware import ALONE, SAME_HARDWARE, Deployment, Shape, deployments
from bench.common.serving import BenchConfig, bench_replicas
from bench.sweep.run import build_parser, main
from bench.sweep.plan import SweepConfig, measured_configs, plan_configs
from bench.sweep.report import write_report
from easyep_sglang.core.spec import load_config, spec_from_model_path
from easyep_sglang.eval.provenance import append_row, read_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BIND = "SGLANG_CPU_OMP_THREADS_BIND"


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models["deepseek_v3"]


def kv_bytes_per_token(model) -> int:
    """MLA: one latent (kv_lora_rank + qk_rope_head_dim values, bf16) per token per layer, on every TP rank."""
    config = load_config(model)
    return config["num_hidden_layers"] * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * 2


def plan(model, out, *flags):
    sweep = SweepConfig(**vars(build_parser().parse_args(["--model-path", str(model), "--experts", "8", "--modes",
                                                          "full", "prune_offline", *flags])))
    return sweep, plan_configs(sweep, spec_from_model_path(model), model, out)


def device_memory_between(model, out) -> int:
    """A device memory that holds the model pruned to 8 experts (and 64 KV tokens), but not the full one."""
    _, configs = plan(model, out)
    full, pruned = configs[0].weight_bytes, configs[1].weight_bytes
    return (full + pruned) // 2 + 64 * kv_bytes_per_token(model)


def test_the_full_model_spans_both_devices_and_the_pruned_one_is_replicated(tiny, tmp_path):
    memory = device_memory_between(tiny, tmp_path)
    args, configs = plan(tiny, tmp_path, "--same-hardware", "2", "--device-memory", f"{memory / 1e6}MB",
                         "--kv-reserve-tokens", "64")
    assert [(c.mode, c.experts, c.layout, c.shape.tp, c.shape.replicas) for c in configs] == [
        ("full", 16, SAME_HARDWARE, 2, 1), ("prune_offline", 8, SAME_HARDWARE, 1, 2), ("prune_offline", 8, ALONE, 1, 1)]
    full, replicated, alone = configs
    per_token = kv_bytes_per_token(tiny)
    assert full.shape.weights_per_device == -(-full.weight_bytes // 2)
    assert full.shape.kv_tokens == (memory - full.shape.weights_per_device) // per_token
    assert replicated.shape.kv_tokens == alone.shape.kv_tokens == (memory - replicated.weight_bytes) // per_token
    kv = ["--max-total-tokens", str(replicated.shape.kv_tokens)]
    assert deployments(replicated.shape, on_cpu=True, as_servers=False) == [
        Deployment(["--tp-size", "1", "--dp-size", "2", *kv], {BIND: "0|1"})]
    assert deployments(replicated.shape, on_cpu=True, as_servers=True) == [
        Deployment(["--tp-size", "1", "--dp-size", "1", *kv], {BIND: "0"}),
        Deployment(["--tp-size", "1", "--dp-size", "1", *kv], {BIND: "1"})]
    assert deployments(full.shape, on_cpu=False, as_servers=True) == [  # a GPU sizes its own KV cache
        Deployment(["--tp-size", "2", "--dp-size", "1"], {})]


def test_the_kv_reserve_decides_the_shape_and_too_little_memory_is_refused(tiny, tmp_path):
    memory, per_token = device_memory_between(tiny, tmp_path), kv_bytes_per_token(tiny)
    _, [pruned] = plan(tiny, tmp_path, "--modes", "prune_offline")
    reserve = (memory - pruned.weight_bytes) // per_token + 1  # one token more than one device leaves
    _, configs = plan(tiny, tmp_path, "--same-hardware", "2", "--device-memory", f"{memory / 1e6}MB",
                      "--kv-reserve-tokens", str(reserve))
    assert [(c.mode, c.layout, c.shape.tp, c.shape.replicas) for c in configs] == [
        ("full", SAME_HARDWARE, 2, 1), ("prune_offline", SAME_HARDWARE, 2, 1)]  # no replicas: none alone
    with pytest.raises(ValueError, match="do not fit 2 devices of .*; raise --device-memory or --same-hardware"):
        plan(tiny, tmp_path, "--same-hardware", "2", "--device-memory", "0.1MB")
    with pytest.raises(ValueError, match="drop --same-memory-budget and --max-total-tokens"):
        plan(tiny, tmp_path, "--same-hardware", "2", "--device-memory", "1GB", "--max-total-tokens", "999")
    with pytest.raises(ValueError, match="--same-hardware needs --device-memory"):
        plan(tiny, tmp_path, "--same-hardware", "2")


def test_each_rank_is_bound_to_one_core():
    assert deployments(Shape(2, 1, 0, 0), on_cpu=True, as_servers=True)[0].env == {BIND: "0|1"}
    assert deployments(Shape(1, 1, 0, 0), on_cpu=True, as_servers=False)[0].env == {BIND: "0"}
    with pytest.raises(ValueError, match="needs 64 CPU cores .* lower --same-hardware"):
        deployments(Shape(2, 32, 0, 0), on_cpu=True, as_servers=True)


def test_base_urls_pick_the_configuration_their_replicas_serve(tiny, tmp_path):
    flags = ["--same-hardware", "2", "--device-memory", "1GB", "--modes", "prune_offline"]
    for urls, layout in ((["http://a:1", "http://b:1"], SAME_HARDWARE), (["http://a:1"], ALONE)):
        sweep, configs = plan(tiny, tmp_path, *flags, "--base-url", *urls)
        [config] = measured_configs(sweep, configs)
        assert (config.mode, config.layout) == ("prune_offline", layout)
    sweep, configs = plan(tiny, tmp_path, *flags, "--base-url", "http://a:1", "http://b:1", "http://c:1")
    with pytest.raises(ValueError, match="3 server.* but 0 planned configurations match"):
        measured_configs(sweep, configs)


def test_the_dry_run_prints_each_servers_flags_and_starts_nothing(tiny, tmp_path, capsys):
    memory = device_memory_between(tiny, tmp_path)
    main(["--model-path", str(tiny), "--experts", "8", "--modes", "full", "prune_offline", "--same-hardware", "2",
          "--device-memory", f"{memory / 1e6}MB", "--kv-reserve-tokens", "64", "--out-dir", str(tmp_path / "sweep"),
          "--dry-run"])
    said = capsys.readouterr().err
    assert re.search(r"dry run: full with 16 experts, TP=2 x 1 replica: .*--tp-size 2 --dp-size 1 --max-total-tokens", said)
    replicas = re.findall(r"dry run: prune_offline with 8 experts, TP=1 x 2 replicas: .*--tp-size 1 --dp-size 1 "
                          r"--max-total-tokens \d+ \(SGLANG_CPU_OMP_THREADS_BIND=(\d)\)", said)
    assert replicas == ["0", "1"]  # one server per replica (--replicas-as servers, the default), a core each
    assert "dry run: prune_offline with 8 experts, TP=1 x 1 replica alone: " in said
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["masks"]  # no rows, no logs, no pruned copy


def test_shapes_are_served_as_planned(tiny, tmp_path):
    """The sweep's own servers: the replicated shape (two servers) and one replica alone, each rank on its core and
    with the KV tokens its device memory leaves; a row per setting with the shape it ran in."""
    memory, out = device_memory_between(tiny, tmp_path), tmp_path / "sweep"
    main(["--model-path", str(tiny), "--experts", "8", "--modes", "prune_offline", "--same-hardware", "2",
          "--device-memory", f"{memory / 1e6}MB", "--kv-reserve-tokens", "64", "--inputs", "16", "--outputs", "8",
          "--concurrency", "2", "--num-prompts", "4", "--out-dir", str(out)])
    rows = read_rows(out / "sweep.jsonl")
    assert [(r["layout"], r["shape_tp"], r["shape_replicas"], r["servers"], r["completed"]) for r in rows] == [
        (SAME_HARDWARE, 1, 2, 2, 4), (ALONE, 1, 1, 1, 4)]
    for row in rows:
        assert row["max_total_num_tokens"] == row["planned_kv_tokens_per_replica"] > 64  # SGLang took the plan's KV
        assert row["memory_budget"] == SAME_HARDWARE and row["devices"] == 2
    assert [r["completed"] for r in rows[0]["replicas"]] == [2, 2]  # the requests dealt evenly over the two servers
    bindings = {log.name.rsplit("-", 1)[1]: re.findall(r"init_threads_binding: .*local_omp_cpuid=(\S+)", log.read_text())
                for log in (out / "logs").iterdir()}
    assert bindings == {"s0.log": ["0"], "s1.log": ["1"], "alone.log": ["0"]}
    assert "| prune_offline | 8 | TP=1 x 2 (2 servers) |" in (out / "sweep.md").read_text()


@pytest.mark.servers("plain:deepseek_v3/fp32")
def test_replicas_share_the_requests_evenly_and_their_counts_add_up(servers):
    server = servers.use("plain:deepseek_v3/fp32")
    result = bench_replicas([server, server], server.model_path, BenchConfig(8, 4, num_prompts=4, concurrency=2))
    assert [part["completed"] for part in result["replicas"]] == [2, 2] and result["completed"] == 4
    assert result["total_output_tokens"] == 16 == sum(part["total_output_tokens"] for part in result["replicas"])
    assert result["duration"] == max(part["duration"] for part in result["replicas"])
    assert result["output_throughput"] == pytest.approx(16 / result["duration"])
    with pytest.raises(ValueError, match="divisible by the replicas"):
        bench_replicas([server, server], server.model_path, BenchConfig(8, 4, num_prompts=3, concurrency=2))


@pytest.mark.servers("plain:deepseek_v3/fp32", "mask:deepseek_v3/varying")
def test_every_replica_must_serve_the_configurations_mask(servers, tmp_path, capsys):
    """Two --base-url replicas of the full model, the second serving a mask: no row is written for them."""
    plain, masked = servers.use("plain:deepseek_v3/fp32"), servers.use("mask:deepseek_v3/varying")
    with pytest.raises(SystemExit):
        main(["--model-path", str(plain.model_path), "--modes", "full", "--base-url", plain.base_url, masked.base_url,
              "--inputs", "8", "--outputs", "4", "--concurrency", "2", "--num-prompts", "2", "--out-dir", str(tmp_path)])
    assert f"easyep: error: the row names no mask, but the server at {masked.base_url} serves mask sha256:" \
        in capsys.readouterr().err
    assert not (tmp_path / "sweep.jsonl").exists()


def test_report_gives_the_speedup_its_spread_and_its_parts(tmp_path):
    base = {"kind": "throughput-sweep", "sweep_id": "s", "model": "m", "sglang_version": "0.5.23", "device": "cpu",
            "git_commit": "c", "concurrency": 32, "num_prompts": 64, "scale": 0.03, "devices": 2,
            "device_memory": "1GB", "nominal_input_len": 1024, "nominal_output_len": 1024, "input_len": 31,
            "output_len": 31, "weights_per_device": 6e8}
    runs = {  # (mode, experts, layout, tp, replicas, KV tokens): output tokens/s in rounds 0, 1, 2
        ("full", 128, SAME_HARDWARE, 2, 1, 400_000): (100.0, 100.0, 80.0),
        ("prune_offline", 64, SAME_HARDWARE, 1, 2, 390_000): (150.0, 190.0, 120.0),
        ("prune_offline", 64, ALONE, 1, 1, 390_000): (100.0, 110.0, 80.0),
    }
    for (mode, experts, layout, tp, replicas, kv), throughputs in runs.items():
        for round_index, throughput in enumerate(throughputs):
            append_row(tmp_path / "sweep.jsonl", {**base, "round": round_index, "mode": mode, "experts": experts,
                                                  "layout": layout, "shape_tp": tp, "shape_replicas": replicas,
                                                  "servers": 1 if layout == ALONE else replicas,
                                                  "max_total_num_tokens": kv, "output_throughput": throughput})
    table = write_report(tmp_path / "sweep.jsonl").read_text()
    assert "| full | 128 | TP=2 x 1 | 600.0 MB | 400,000 | 100.0 (1.00x, 1.00-1.00) |" in table
    # per-round ratios 1.5, 1.9, 1.5 and, alone, 1.0, 1.1, 1.0: medians 1.5 and 1.0
    assert "| prune_offline | 64 | TP=1 x 2 (2 servers) | 600.0 MB | 390,000 | 150.0 (1.50x, 1.50-1.90) |" in table
    assert "| prune_offline | 64 | TP=1 x 1 (one replica alone) | 600.0 MB | 390,000 | 100.0 (1.00x, 1.00-1.10) |" in table
    assert "| prune_offline | 64 | 2 | 1.000 | 2.000 | 1.500 | 0.750 |" in table
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG_MAGIC)
