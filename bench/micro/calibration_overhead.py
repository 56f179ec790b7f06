"""Calibration prefill throughput with the statistics recorder on vs off, and the size of its file.

    .venv/bin/python -m bench.micro.calibration_overhead [--model-path DIR | --arch deepseek_v3 [--fp8]] [--samples 12]
        [--tokens 512] [--rounds 2] [--repeats 3] [SGLang args...]

--fp8 builds the tiny DeepSeek-V3 in R1's FP8 layout (demo_model --fp8), served through SGLang's FP8 code with
bf16 activations; the recorder dequantizes the chosen experts (sglang_plugin/stats_recorder.py).

"off" is the plain server started by our launcher; "on" is the same server with --record-stats,
recording. Both run with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0, as --record-stats sets it:
with /health generating (SGLang's default) each /flush_cache takes ~0.5 s here, which would swamp
a 30 ms prefill. Both run the calibration driver's loop (flush the prefix cache, prefill one sample with
max_new_tokens=1) over the same random token ids, after one untimed warm-up sample, --repeats
times per server. Servers are started one at a time, alternating off/on for --rounds rounds, so
load from other work on the machine hits both modes. In the "on" server every recording pass is
followed by a pass with recording stopped ("idle": hooks installed, nothing recorded), so each
adjacent pair also gives a ratio measured seconds apart, which drifting load disturbs least.
Printed as JSON: best and median throughput per mode, the ratios on/off (goal >= 0.5), the median
paired ratio on/idle, and the size of the statistics file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from easyep_sglang.core.spec import load_config
from easyep_sglang.demo.tiny_models import SUPPORTED_ARCHS, build_tiny_model
from easyep_sglang.serving.calibrate import DUMP_GLOB, Sample, ServerClient, flush_prefix_cache
from easyep_sglang.serving.server_process import LaunchedServer


def random_samples(vocab_size: int, count: int, length: int, seed: int = 0) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (count, length), generator=generator)  # ids 0-3 are special in the demo models
    return [Sample(tuple(row.tolist())) for row in ids]


def prefill_seconds(client: ServerClient, samples: list[Sample]) -> float:
    """Wall time of the driver's loop: flush the prefix cache, then prefill one sample, in turn."""
    start = time.perf_counter()
    for sample in samples:
        flush_prefix_cache(client)
        meta = client.generate([sample.token_ids], [{"max_new_tokens": 1, "temperature": 0.0}])[0]["meta_info"]
        assert meta["cached_tokens"] == 0
    return time.perf_counter() - start


def run_round(model: Path, record: bool, samples: list[Sample], warmup: Sample, repeats: int, sglang_args: list[str],
              workdir: Path) -> dict[str, list[float]]:
    """Tokens per second of every pass, by mode: {"off": [...]} or {"on": [...], "idle": [...], "stats_file_bytes"}."""
    stats_dir = workdir / "stats"
    extra = ["--record-stats", str(stats_dir), *sglang_args] if record else list(sglang_args)
    tokens = sum(len(s.token_ids) for s in samples)
    result = {"on": [], "idle": []} if record else {"off": []}
    log = workdir / f"server-{'on' if record else 'off'}.log"
    with LaunchedServer(model, extra_args=extra, env={"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0"}, log_path=log) as server:
        client = ServerClient(server.base_url)
        prefill_seconds(client, [warmup])
        for _ in range(repeats):
            if not record:
                result["off"].append(tokens / prefill_seconds(client, samples))
                continue
            client.expert_record("start")
            result["on"].append(tokens / prefill_seconds(client, samples))
            client.expert_record("stop")
            result["idle"].append(tokens / prefill_seconds(client, samples))
        if record:
            client.expert_record("dump")
            result["stats_file_bytes"] = max(stats_dir.glob(DUMP_GLOB)).stat().st_size  # names end in the unix time in ns
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro.calibration_overhead", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments go to both servers (e.g. --dtype float32).")
    parser.add_argument("--model-path", metavar="DIR", help="model to serve (default: a tiny --arch model built here)")
    parser.add_argument("--arch", default="deepseek_v3", choices=sorted(SUPPORTED_ARCHS), help="tiny model to build")
    parser.add_argument("--fp8", action="store_true", help="build the tiny model in DeepSeek-R1's FP8 layout")
    parser.add_argument("--samples", type=int, default=12, help="prefills per timed pass (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sample (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="off/on server pairs, alternating (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per server (default: %(default)s)")
    args, sglang_args = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="easyep-bench-") as tmp:
        workdir = Path(tmp)
        model = Path(args.model_path) if args.model_path else build_tiny_model(args.arch, workdir / "model", fp8=args.fp8)
        samples = random_samples(load_config(model)["vocab_size"], args.samples + 1, args.tokens)
        results = []
        for index in range(args.rounds):
            for record in (False, True):
                results.append(run_round(model, record, samples[1:], samples[0], args.repeats, sglang_args, workdir))
                print(f"round {index + 1}: {results[-1]}", file=sys.stderr, flush=True)
    passes = {mode: [t for r in results for t in r.get(mode, [])] for mode in ("off", "on", "idle")}
    best, median = ({mode: f(passes[mode]) for mode in passes} for f in (max, statistics.median))
    print(json.dumps({
        "model": str(args.model_path or f"tiny {args.arch} ({'FP8, R1 layout' if args.fp8 else 'bf16'})"),
        "sglang_args": sglang_args,
        "omp_threads_bind": os.environ.get("SGLANG_CPU_OMP_THREADS_BIND", "all cores"), "samples": args.samples,
        "tokens_per_sample": args.tokens, "rounds": args.rounds, "repeats": args.repeats,
        "prefill_tokens_per_s": {m: {"best": round(best[m], 1), "median": round(median[m], 1)} for m in passes},
        "ratio_on_over_off": {"best": round(best["on"] / best["off"], 3), "median": round(median["on"] / median["off"], 3)},
        "paired_ratio_on_over_idle": round(statistics.median(a / b for a, b in zip(passes["on"], passes["idle"])), 3),
        "goal": "ratio >= 0.5", "stats_file_bytes": results[-1]["stats_file_bytes"],
    }, indent=2))


if __name__ == "__main__":
    main()
