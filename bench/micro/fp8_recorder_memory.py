"""Peak extra memory of the calibration recorder on FP8 block-quantized experts, on DeepSeek-R1's shapes.

    .venv/bin/python -m bench.micro.fp8_recorder_memory [--tp-size 8] [--tokens 4096] [--experts 256]

Runs the recorder's expert computation (`stats_recorder._expert_outputs`, the code the server runs) on random
FP8 expert weights laid out as SGLang's Fp8MoEMethod holds them on one TP rank (w13 [E, 2I/tp, H],
w2 [E, H, I/tp] in float8_e4m3fn with float32 scales per 128x128 block; R1: H = 7168, I = 2048), for --tokens
tokens of bf16 activations routed top-8 over --experts experts. torch's profiler records every allocation; the
peak of their running sum, minus the output e [T, 8, H] in float32 that the recorder keeps, is the extra
memory. Printed as JSON, with its ratio to one expert's bf16 weights on that rank (3 x H x I/tp x 2 bytes).
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

from easyep_sglang.checkpoint.fp8_blocks import BLOCK
from easyep_sglang.sglang_plugin.stats_recorder import _expert_outputs

HIDDEN, MOE_INTERMEDIATE, TOP_K = 7168, 2048, 8  # DeepSeek-R1


def fp8_experts(count: int, intermediate: int, generator: torch.Generator) -> SimpleNamespace:
    def weight(out_features: int, in_features: int):
        w = (torch.randn(count, out_features, in_features, generator=generator) * 0.5).to(torch.float8_e4m3fn)
        scale = torch.rand(count, out_features // BLOCK, in_features // BLOCK, generator=generator) * 1e-3
        return w, scale

    w13, w13_scale = weight(2 * intermediate, HIDDEN)
    w2, w2_scale = weight(HIDDEN, intermediate)
    return SimpleNamespace(w13_weight=w13, w2_weight=w2, w13_weight_scale_inv=w13_scale, w2_weight_scale_inv=w2_scale)


def peak_allocated(fn) -> tuple[int, object]:
    """(peak of the running sum of the bytes `fn` allocates and frees, its result), from torch's profiler."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro.fp8_recorder_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp-size", type=int, default=8, help="TP ranks the experts are split over (default: 8)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the prefill chunk (default: %(default)s)")
    parser.add_argument("--experts", type=int, default=256,
                        help="experts on the rank (TP splits each expert, so R1 has all 256 on every rank; default: 256)")
    args = parser.parse_args(argv)
    intermediate = MOE_INTERMEDIATE // args.tp_size
    generator = torch.Generator().manual_seed(0)
    experts = fp8_experts(args.experts, intermediate, generator)
    x = torch.randn(args.tokens, HIDDEN, generator=generator).to(torch.bfloat16)  # [T, H]
    ids = torch.stack([torch.randperm(args.experts, generator=generator)[:TOP_K] for _ in range(args.tokens)])  # [T, k]
    peak, out = peak_allocated(lambda: _expert_outputs(experts, x, ids, BLOCK))
    kept_output = out.numel() * out.element_size()
    expert_bf16 = 3 * HIDDEN * intermediate * 2
    print(json.dumps({
        "shapes": f"R1 at TP={args.tp_size}: H={HIDDEN}, I/tp={intermediate}, top-{TOP_K}, {args.tokens} tokens",
        "one_expert_bf16_bytes": expert_bf16,
        "output_e_bytes": kept_output,
        "peak_allocated_bytes": peak,
        "extra_bytes": peak - kept_output,
        "extra_over_one_expert_bf16": round((peak - kept_output) / expert_bf16, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
