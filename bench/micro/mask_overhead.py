"""What masking at the gate costs: decode throughput of the masked vs the unmasked server, same model.

    python -m bench.micro.mask_overhead [--model-path DIR] [--rounds 5] [--num-prompts 16] [--concurrency 8]

Both servers run at once (each with --sleep-on-idle, so the idle one leaves the CPU to the busy one,
and one OpenMP thread by default: on a shared 2-core host, threads spinning at barriers for a preempted
peer swing throughput tenfold from run to run).
After a warm-up run on each, the rounds interleave: A B, B A, A B, ... (A = unmasked, B = masked; the
order alternates so a slow drift of the host's load hits both sides alike). The figure is the median
over rounds of masked/unmasked output throughput; the goal is >= 0.99. Beside it, the same ratio of
output tokens per server CPU-second, which other work on the host barely moves. The mask keeps half the
experts of every MoE layer, spread over the groups so it passes ExpertMask.resolve.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.common.serving import BenchConfig, bench_server, omp_env, sigterm_unwinds
from bench.sweep.plan import first_experts_mask, launcher_flags
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.eval.provenance import append_row, provenance
from easyep_sglang.serving.server_process import LaunchedServer

GOAL = 0.99


def median_ratio(rounds: list[dict], key: str) -> float:
    """Median over rounds of masked / unmasked `key`."""
    return statistics.median(r["masked"][key] / r["unmasked"][key] for r in rounds)


def run(args) -> dict:
    work = Path(args.out).parent
    model_path = Path(args.model_path) if args.model_path else None
    with ExitStack() as stack:
        if model_path is None:
            from easyep_sglang.demo.tiny_models import build_tiny_model

            model_path = build_tiny_model("deepseek_v3", Path(stack.enter_context(tempfile.TemporaryDirectory())) / "m")
        spec = spec_from_model_path(model_path)
        mask = first_experts_mask(spec, spec.n_experts // 2)
        mask_path = work / f"mask-half-{spec.n_experts // 2}.json"
        mask.save(mask_path)
        flags = ["--sleep-on-idle", *launcher_flags(args.mem_fraction_static, args.server_args)]
        servers = {}
        for name, mask_arg in (("unmasked", None), ("masked", mask_path)):
            servers[name] = stack.enter_context(LaunchedServer(
                model_path, mask=mask_arg, extra_args=flags, log_path=work / f"mask_overhead-{name}.log",
                env=omp_env(args.omp_threads), startup_timeout=args.startup_timeout))
        bench = BenchConfig(args.input_len, args.output_len, args.num_prompts, args.concurrency)
        for server in servers.values():  # warm-up, discarded
            bench_server(server, model_path, BenchConfig(args.input_len, args.output_len, 4, 4))
        rounds = []
        for r in range(args.rounds):
            order = ("unmasked", "masked") if r % 2 == 0 else ("masked", "unmasked")
            rounds.append({name: bench_server(servers[name], model_path, bench) for name in order})
            print(f"round {r + 1}: " + "; ".join(
                f"{name} {rounds[-1][name]['output_throughput']:.1f} tok/s, "
                f"{rounds[-1][name]['output_tokens_per_cpu_s']:.1f} tok/CPU-s" for name in servers), flush=True)
        row = {
            "kind": "mask-overhead", "rounds": rounds, "input_len": bench.input_len, "output_len": bench.output_len,
            "num_prompts": bench.num_prompts, "concurrency": bench.concurrency, "server_args": flags, "goal": GOAL,
            "omp_threads": args.omp_threads,
            "output_throughput_ratio": median_ratio(rounds, "output_throughput"),
            "cpu_normalised_ratio": median_ratio(rounds, "output_tokens_per_cpu_s"),
            **provenance(servers["masked"].base_url, mask_path=mask_path, model_path=model_path),
        }
    append_row(args.out, row)
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.micro.mask_overhead", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model-path", help="MoE model directory (default: build a tiny DeepSeek-V3 in a temp dir)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--num-prompts", type=int, default=16, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--mem-fraction-static", type=float, default=0.2, help="for both servers")
    parser.add_argument("--omp-threads", type=int, default=1, help="OMP_NUM_THREADS of each server (default: 1; "
                        "0 = torch's default)")
    parser.add_argument("--server-args", default="", help="more launcher/SGLang flags for both servers, quoted")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for each server")
    parser.add_argument("--out", default="runs/mask_overhead.jsonl", help="report row appended here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    try:
        with sigterm_unwinds():
            row = run(args)
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as err:
        print(f"easyep: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    verdict = lambda ratio: "meets" if ratio >= GOAL else "misses"
    print(f"masked/unmasked, median of {args.rounds} rounds: output throughput {row['output_throughput_ratio']:.3f} "
          f"({verdict(row['output_throughput_ratio'])} the goal {GOAL}); output tokens per server CPU-second "
          f"{row['cpu_normalised_ratio']:.3f} ({verdict(row['cpu_normalised_ratio'])} it; the fairer figure when "
          f"other work shares the host, load now {row['host_load_1m']}); {time.monotonic() - start:.0f}s; "
          f"row appended to {args.out}")
    print("rerun: python -m bench.micro.mask_overhead " + shlex.join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
