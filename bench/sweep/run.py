"""Throughput sweep: the full model vs expert masks (and pruned checkpoints) over input x output lengths.

    python -m bench.sweep --model-path DIR --experts 8 [--scale 0.03] [--modes full masked]
    python -m bench.sweep --bench-model expert-dominated --experts 64 32 --scale 0.03
    python -m bench.sweep --base-url http://127.0.0.1:30000 --model-path DIR --modes masked --mask-file m.json
    python -m bench.sweep --bench-model expert-dominated --same-hardware 2 --experts 64 32 --modes full prune_offline

The shape of the EASY-EP paper's throughput study (its Figures 1 and 6: SGLang, concurrency 32,
{1K, 4K} input x {1K, 4K} output, speedup over the full model vs experts kept). Each configuration gets
its own server, started and stopped here, one at a time (or, with --base-url, the one server already running
there is measured, as the configuration it is said to serve). Each (input, output) setting is one
bench_serving run and one JSONL row with provenance, the mask digest the server reports included (a server
that serves another mask than its configuration's stops the sweep); then a markdown table and a PNG are rendered.

Modes: full (no mask); masked (launcher --mask: experts loaded, never routed to); prune_load (launcher
--prune: drop masked experts at load time); prune_offline (python -m easyep_sglang.prune, then serve the
pruned checkpoint). A pruned mode the launcher or pruner does not support is skipped with the reason.

--rounds N serves the whole list of configurations N times in turn (full, masked, ..., full, masked, ...),
so slow drift in the host's load hits every mode alike; the report takes each run's ratio to the full
model of the same round and setting, then the median over rounds. Each row records the served weight
bytes (from the safetensors headers), so the memory ratio can be read against the ideal weight ratio.

--same-hardware DEVICES deploys every configuration on the same DEVICES devices of --device-memory each, in
the smallest shape that holds its weights plus a KV reserve (bench.sweep.same_hardware, planned in bench.sweep.plan):
the full model with TP over the devices it needs, a pruned model that fits fewer as data-parallel replicas, one
server each, dealt the requests in turn (--replicas-as dp: one server with SGLang's --dp-size). A replicated
configuration is also measured as one replica alone on its own devices, the part the replicas multiply. On a
CPU a device is one core. The report (bench.sweep.same_hardware_report) gives the speedup on the
same devices with its spread over rounds, and its parts.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.sweep.same_hardware import ALONE, SAME_HARDWARE, Deployment, deployments
from bench.common.serving import BenchConfig, bench_replicas, omp_env, served_at, sigterm_unwinds
from bench.sweep.plan import (BENCH_MODELS, MODES, Launch, ServerConfig, SweepConfig, build_bench_model,
                              device_memory, measured_configs, plan_configs, scaled, server_flags)
from bench.sweep.report import write_report
from easyep_sglang.core.mask import MaskError
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.eval.provenance import append_row, provenance
from easyep_sglang.serving.server_process import LaunchedServer
from easyep_sglang.sglang_plugin.server_env import gpu_available

def prepare_server(config: ServerConfig, model_path: Path, out_dir: Path) -> tuple[Launch | None, str | None]:
    """How to launch a configuration's server, or None and the reason it is skipped."""
    if config.mode == "full":
        return Launch(model_path), None
    if config.mode == "masked":
        return Launch(model_path, config.mask_path), None
    if config.mode == "prune_load":
        help_text = subprocess.run([sys.executable, "-m", "easyep_sglang.launch", "--help"],
                                   capture_output=True, text=True).stdout
        if "--prune" not in help_text:
            return None, "the launcher has no --prune flag (python -m easyep_sglang.launch --help)"
        return Launch(model_path, config.mask_path, ("--prune",)), None
    pruned = out_dir / "pruned" / config.mask_path.stem
    command = [sys.executable, "-m", "easyep_sglang.prune", "--model-path", str(model_path),
               "--mask", str(config.mask_path), "--out", str(pruned), "--force"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        return None, f"the offline pruner rejected it ({shlex.join(command)}: exit {proc.returncode}: {tail})"
    return Launch(pruned), None


def run_sweep(sweep: SweepConfig) -> Path | None:
    out_dir = Path(sweep.out_dir)
    model_path = Path(sweep.model_path) if sweep.model_path else build_bench_model(sweep.bench_model, out_dir)
    spec = spec_from_model_path(model_path)
    configs = measured_configs(sweep, plan_configs(sweep, spec, model_path, out_dir))
    sweep_id, on_cpu = sweep.sweep_id or time.strftime("%Y%m%dT%H%M%S"), not gpu_available()
    if sweep.dry_run:
        for config in configs:
            try:
                planned = config_deployments(sweep, config, on_cpu)
            except ValueError as err:  # e.g. a GPU plan checked on a CPU host with fewer cores than its devices
                print(f"easyep: dry run: {config.label()}: not here: {err}", file=sys.stderr)
                continue
            for server in planned:
                bound = " ".join(f"{key}={value}" for key, value in server.env.items())
                print(f"easyep: dry run: {config.label()}: {shlex.join(server.flags)}{f' ({bound})' if bound else ''}",
                      file=sys.stderr)
        return None
    settings = [(i, o, scaled(i, sweep.scale), scaled(o, sweep.scale)) for i in sweep.inputs for o in sweep.outputs]
    rows_path, skipped, launches = out_dir / "sweep.jsonl", [], {}
    for config in configs:
        if sweep.base_url:
            launches[config] = Launch(model_path, config.mask_path)
            continue
        launches[config], reason = prepare_server(config, model_path, out_dir)
        if reason:
            print(f"easyep: skipping {config.label()}: {reason}", file=sys.stderr)
            skipped.append(f"{config.label()}: {reason}")
    for round_index in range(sweep.first_round, sweep.first_round + sweep.rounds):
        for config, launch in launches.items():
            if launch is None:
                continue
            run = Run(sweep, config, launch, model_path, settings, sweep_id, round_index, rows_path)
            reason = run.measure_remote() if sweep.base_url else run.serve_and_measure(on_cpu)
            if reason:
                print(f"easyep: skipping {config.label()}: {reason}", file=sys.stderr)
                skipped.append(f"{config.label()}, round {round_index}: {reason}")
    return write_report(rows_path, sweep_id, skipped)


def config_deployments(sweep: SweepConfig, config: ServerConfig, on_cpu: bool) -> list[Deployment]:
    """The servers of a configuration: the sweep's flags for each, then those of its shape (beyond model and mask)."""
    if not config.shape:
        return [Deployment(server_flags(sweep), {})]
    return [Deployment(server_flags(sweep) + server.flags, server.env)
            for server in deployments(config.shape, on_cpu, as_servers=sweep.replicas_as == "servers")]


@dataclass(frozen=True)
class Run:
    """One configuration in one round: its server(s), and a row per (input, output) setting."""
    sweep: SweepConfig
    config: ServerConfig
    launch: Launch
    model_path: Path
    settings: list[tuple[int, int, int, int]]
    sweep_id: str
    round_index: int
    rows_path: Path

    def measure_remote(self) -> None:
        """Measure the servers at --base-url, started elsewhere (several: the configuration's replicas)."""
        self.measure([served_at(url) for url in self.sweep.base_url], None)

    def serve_and_measure(self, on_cpu: bool) -> str | None:
        """Start the configuration's server(s), measure them, stop them; the reason if they cannot start."""
        sweep, config = self.sweep, self.config
        name = f"{self.sweep_id}-r{self.round_index}-{config.mode}-{config.experts:g}{'-alone' if config.layout == ALONE else ''}"
        planned = config_deployments(sweep, config, on_cpu)
        servers = []
        for index, server in enumerate(planned):
            log = Path(sweep.out_dir) / "logs" / f"{name}{f'-s{index}' if len(planned) > 1 else ''}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            servers.append(LaunchedServer(self.launch.model_path, mask=self.launch.mask, log_path=log,
                                          extra_args=[*self.launch.extra_args, *server.flags],
                                          env={**omp_env(sweep.omp_threads), **server.env},
                                          startup_timeout=sweep.startup_timeout))
        try:
            for server in servers:
                server.spawn()
            for server in servers:
                server.wait_until_healthy()
        except (RuntimeError, TimeoutError) as err:
            for server in servers:
                server.stop()
            lines = [l for s in servers if s.log_path.exists() for l in s.log_path.read_text(errors="replace").splitlines()
                     if l.strip()]
            said = next((l for l in reversed(lines) if l.startswith("easyep: error")), lines[-1] if lines else "")
            return f"the server did not start ({err}); {said}"
        try:
            self.measure(servers, [*self.launch.extra_args, *planned[0].flags])
        finally:
            for server in servers:
                server.stop()
        return None

    def measure(self, servers: list, flags: list[str] | None) -> None:
        """One bench_serving run and one row per setting; `flags` are those the sweep started the server with
        (None: started elsewhere, --base-url)."""
        sweep, config = self.sweep, self.config
        for nominal_in, nominal_out, input_len, output_len in self.settings:
            bench = BenchConfig(input_len, output_len, sweep.num_prompts or 2 * sweep.concurrency, sweep.concurrency)
            print(f"easyep: {config.label()}, {input_len} in / {output_len} out", file=sys.stderr, flush=True)
            result = bench_replicas(servers, self.launch.model_path, bench)
            append_row(self.rows_path, {
                "kind": "throughput-sweep", "sweep_id": self.sweep_id, "round": self.round_index, "mode": config.mode,
                "experts": config.experts, "weight_bytes": config.weight_bytes,
                "nominal_input_len": nominal_in, "nominal_output_len": nominal_out, "scale": sweep.scale,
                "input_len": input_len, "output_len": output_len, "concurrency": bench.concurrency,
                "num_prompts": bench.num_prompts, "memory_budget": self.memory_budget(flags),
                "server_args": flags, "omp_threads": None if flags is None else sweep.omp_threads,
                "servers": len(servers), **self.shape_facts(),
                **self.provenance(servers), **result,
            })

    def provenance(self, servers: list) -> dict:
        """The first server's provenance; every server must serve the configuration's mask (ServedMaskMismatch)."""
        facts = [provenance(s.base_url, mask_path=self.config.mask_path, model_path=self.model_path) for s in servers]
        return facts[0]

    def memory_budget(self, flags: list[str] | None) -> str:
        if self.config.shape:
            return SAME_HARDWARE
        if flags is None:
            return "as started elsewhere"
        return "same-mem-fraction" if self.sweep.same_memory_budget else "fixed-kv-tokens"

    def shape_facts(self) -> dict:
        shape = self.config.shape
        if shape is None:
            return {}
        return {"layout": self.config.layout, "devices": self.sweep.same_hardware,
                "device_memory": device_memory(self.sweep), "shape_tp": shape.tp,
                "shape_replicas": shape.replicas, "replicas_as": self.sweep.replicas_as if shape.replicas > 1 else None,
                "weights_per_device": shape.weights_per_device,
                "planned_kv_tokens_per_replica": shape.kv_tokens}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-path", help="local model directory to benchmark")
    model.add_argument("--bench-model", choices=sorted(BENCH_MODELS),
                       help="build (once, under --out-dir/models) and benchmark a random-weight DeepSeek-V3")
    parser.add_argument("--experts", type=int, nargs="+", default=SweepConfig.experts,
                        help="experts kept per MoE layer, one masked config each (default: 1/2 and 1/4 of them)")
    parser.add_argument("--mask-file", nargs="+", default=SweepConfig.mask_file, help="also benchmark these mask files")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=SweepConfig.modes, help="(default: full masked)")
    parser.add_argument("--inputs", type=int, nargs="+", default=SweepConfig.inputs,
                        help="nominal input lengths (default: 1024 4096)")
    parser.add_argument("--outputs", type=int, nargs="+", default=SweepConfig.outputs,
                        help="nominal output lengths (default: 1024 4096)")
    parser.add_argument("--scale", type=float, default=SweepConfig.scale,
                        help="multiply every length (default: 1; e.g. 0.03 on a CPU)")
    parser.add_argument("--rounds", type=int, default=SweepConfig.rounds,
                        help="serve every configuration this many times, in turn; ratios are medians (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=SweepConfig.concurrency, help="requests in flight (paper: 32)")
    parser.add_argument("--num-prompts", type=int, default=SweepConfig.num_prompts,
                        help="requests per run (default: 2 x concurrency)")
    parser.add_argument("--same-memory-budget", action="store_true",
                        help="one --mem-fraction-static for every config and no KV token cap, so memory a pruned "
                        "model frees becomes KV cache (default: the launcher's fixed KV token cap on a CPU)")
    parser.add_argument("--mem-fraction-static", type=float, help="passed to every server (default: per bench model)")
    parser.add_argument("--max-total-tokens", type=int, help="fixed KV cache tokens for every server")
    parser.add_argument("--omp-threads", type=int, help="OMP_NUM_THREADS of every server (default: torch's); "
                        "1 steadies CPU numbers on a shared host")
    parser.add_argument("--server-args", default=SweepConfig.server_args,
                        help="more launcher/SGLang flags for every server, quoted")
    parser.add_argument("--startup-timeout", type=float, default=SweepConfig.startup_timeout,
                        help="seconds to wait for each server")
    parser.add_argument("--same-hardware", type=int, metavar="DEVICES",
                        help="deploy every configuration on DEVICES devices in the smallest shape that fits: TP over "
                        "the fewest devices, data-parallel replicas (--dp-size) over the rest; each replicated "
                        "configuration is also measured as one replica alone. On a CPU a device is one core")
    parser.add_argument("--device-memory", help="with --same-hardware: each device's memory for weights and KV cache, "
                        "e.g. 80GB (default: the bench model's)")
    parser.add_argument("--replicas-as", choices=("servers", "dp"), default=SweepConfig.replicas_as,
                        help="with --same-hardware: serve replicas as one server each, dealt the requests in turn "
                        "(default; as the GPU recipe serves one per node), or as one server with SGLang's --dp-size")
    parser.add_argument("--kv-reserve-tokens", type=int, help="with --same-hardware: KV tokens a replica must hold for "
                        "its shape to fit (default: concurrency x the longest scaled input + output)")
    parser.add_argument("--base-url", nargs="+", default=SweepConfig.base_url, help="measure the server(s) already "
                        "running at these URLs instead of starting one per configuration: give --model-path and the "
                        "one --modes (and mask) they serve; "
                        "several URLs are replicas, the requests split evenly over them. A server that serves "
                        "another mask stops the sweep; memory and CPU are read for loopback servers only")
    parser.add_argument("--sweep-id", help="append the rows to this sweep (default: a new one, named by the time); "
                        "with --base-url, measurements of one sweep made one configuration at a time pair by round")
    parser.add_argument("--first-round", type=int, default=SweepConfig.first_round,
                        help="the index of the first round (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="plan every configuration and print its server flags; "
                        "start nothing")
    parser.add_argument("--out-dir", default=SweepConfig.out_dir, help="sweep.jsonl (appended), sweep.md, sweep.png, logs")
    return parser


def main(argv: list[str] | None = None) -> None:
    sweep = SweepConfig(**vars(build_parser().parse_args(argv)))
    try:
        with sigterm_unwinds():
            table_path = run_sweep(sweep)
    except (MaskError, ValueError, FileNotFoundError, RuntimeError, TimeoutError) as err:
        print(f"easyep: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if table_path:
        print(table_path.read_text())
