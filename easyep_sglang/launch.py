"""Start SGLang's OpenAI-compatible server with an expert mask applied at gating time.

    python -m easyep_sglang.launch --model-path DIR --mask mask.json [any sglang.launch_server argument]

The mask is validated against the model before SGLang starts. Every other argument goes to
`python -m sglang.launch_server` unchanged. On a machine with no GPU the CPU work-arounds and
memory caps are added (each can be overridden by passing the flag yourself).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from easyep_sglang.mask import ExpertMask, MaskError
from easyep_sglang.pruned_checkpoint import read_pruned_checkpoint
from easyep_sglang.pruned_checkpoint import read_pruned_checkpoint
from easyep_sglang.sglang_plugin.server_env import gpu_available, server_setup
from easyep_sglang.spec import spec_from_model_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m easyep_sglang.launch",
        description=__doc__.split("\n\n")[0],
        epilog="All other arguments are passed to `python -m sglang.launch_server` (see its --help).",
    )
    parser.add_argument("--model-path", "--model", dest="model_path", required=True,
                        help="local Hugging Face model directory (also passed to SGLang)")
    parser.add_argument("--mask", help="JSON expert mask (format 1, or see `python -m easyep_sglang.mask`); "
                        "masked experts are loaded but never routed to")
    parser.add_argument("--prune", action="store_true",
                        help="with --mask: build only the kept experts (memory for pruned experts is never allocated)")
    parser.add_argument("--record-stats", metavar="DIR",
                        help="record EASY-EP calibration statistics during prefill (TP, bf16/fp32 experts); "
                        "/start_expert_distribution_record resets them, /dump_expert_distribution_record writes "
                        "DIR/easyep_stats_<unix ns>.safetensors (see python -m easyep_sglang.calibrate)")
    parser.add_argument("--device", help="passed to SGLang; 'cpu' (or no GPU present) turns on the CPU work-arounds")
    parser.add_argument("--tp-size", "--tp", dest="tp_size", type=int, default=1, help="passed to SGLang")
    return parser


def prepare(argv: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Validate our arguments; return the full launch_server argument list and its environment."""
    args, passthrough = build_parser().parse_known_args(argv)
    if args.prune and not args.mask:
        raise ValueError("--prune needs --mask: it builds only the experts the mask keeps")
    pruned = read_pruned_checkpoint(args.model_path) if (Path(args.model_path) / "config.json").is_file() else None
    ours = ["--model-path", args.model_path, "--tp-size", str(args.tp_size)]
    if pruned and args.mask:
        raise ValueError(f"{args.model_path} is already pruned; serve it without --mask/--prune")
    if args.mask:
        spec = spec_from_model_path(args.model_path)
        mask = ExpertMask.load(args.mask)
        summary = mask.summary(spec)  # validates; raises MaskError naming the layer and the fix
        if args.prune and set(mask.resolve(spec)) & set(spec.mtp_layers):
            raise ValueError("MTP layers cannot be pruned at load time; use python -m easyep_sglang.prune")
        print(f"easyep: {spec.describe()}; {summary}", file=sys.stderr)
    if pruned and pruned.needs_plugin:
        if any(a.startswith("--json-model-override-args") for a in passthrough):
            raise ValueError("--json-model-override-args cannot be combined with a plugin-served pruned checkpoint")
        ours += ["--json-model-override-args", json.dumps(pruned.source_overrides)]
        print(f"easyep: pruned checkpoint ({pruned.stock_engine} in stock engines), served in its source routing "
              f"space: {sum(map(len, pruned.keep.values()))} experts in {len(pruned.keep)} pruned layers", file=sys.stderr)
    on_cpu = args.device == "cpu" or (args.device is None and not gpu_available())
    setup = server_setup(args.mask, on_cpu=on_cpu, tp_size=args.tp_size, prune=args.prune,
                         stats_dir=args.record_stats, pruned_checkpoint=bool(pruned and pruned.needs_plugin))
    if args.device:
        ours += ["--device", args.device]
    return ours + passthrough + setup.cli_args(ours + passthrough), setup.env


def main(argv: list[str] | None = None) -> None:
    try:
        server_argv, env = prepare(argv)
    except (MaskError, ValueError, FileNotFoundError) as err:
        print(f"easyep: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    command = [sys.executable, "-m", "sglang.launch_server", *server_argv]
    print("easyep: " + " ".join(command), file=sys.stderr, flush=True)
    os.execve(sys.executable, command, env)  # same PID: whoever started us can stop the server


if __name__ == "__main__":
    main()
