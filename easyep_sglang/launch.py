"""Start SGLang's OpenAI-compatible server with an expert mask applied at gating time.

    python -m easyep_sglang.launch --model-path DIR --mask mask.json [any sglang.launch_server argument]

The mask is validated against the model before SGLang starts. Every other argument goes to
`python -m sglang.launch_server` unchanged. On a machine with no GPU the CPU work-arounds and
memory caps are added (each can be overridden by passing the flag yourself).
"""

from __future__ import annotations

import argparse
import os
import sys

from easyep_sglang.mask import ExpertMask, MaskError
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
    parser.add_argument("--device", help="passed to SGLang; 'cpu' (or no GPU present) turns on the CPU work-arounds")
    parser.add_argument("--tp-size", "--tp", dest="tp_size", type=int, default=1, help="passed to SGLang")
    return parser


def prepare(argv: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Validate our arguments; return the full launch_server argument list and its environment."""
    args, passthrough = build_parser().parse_known_args(argv)
    if args.prune and not args.mask:
        raise ValueError("--prune needs --mask: it builds only the experts the mask keeps")
    if args.mask:
        spec = spec_from_model_path(args.model_path)
        mask = ExpertMask.load(args.mask)
        summary = mask.summary(spec)  # validates; raises MaskError naming the layer and the fix
        if args.prune and set(mask.resolve(spec)) & set(spec.mtp_layers):
            raise ValueError("MTP layers cannot be pruned at load time; use python -m easyep_sglang.prune")
        print(f"easyep: {spec.describe()}; {summary}", file=sys.stderr)
    on_cpu = args.device == "cpu" or (args.device is None and not gpu_available())
    setup = server_setup(args.mask, on_cpu=on_cpu, tp_size=args.tp_size, prune=args.prune)
    ours = ["--model-path", args.model_path, "--tp-size", str(args.tp_size)]
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
