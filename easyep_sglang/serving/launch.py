"""Start SGLang's OpenAI-compatible server with an expert mask applied at gating time.

    python -m easyep_sglang.launch --model-path DIR --mask mask.json [any sglang.launch_server argument]

The mask is validated against the model before SGLang starts. Every other argument goes to
`python -m sglang.launch_server` unchanged. On a machine with no GPU the CPU work-arounds and
memory caps are added (each can be overridden by passing the flag yourself). The server fails closed:
it exits non-zero, naming the worker and the cause, when a worker fails to start or did not apply what
was asked (see sglang_plugin/serve.py and fail_closed.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from pathlib import Path

from easyep_sglang.serving.launch_checks import (check_cpu_settings, check_expert_split, check_settings, ranks_per_node,
                                                 settings_from_cli)
from easyep_sglang.checkpoint.pruned_checkpoint import check_load_time_prune, read_pruned_checkpoint
from easyep_sglang.core.mask import ExpertMask, MaskError
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.sglang_plugin import TESTED_SGLANG_VERSION
from easyep_sglang.sglang_plugin.server_args_check import check_server_arguments
from easyep_sglang.sglang_plugin.server_env import PLUGIN_NAME, gpu_available, server_setup
from easyep_sglang.sglang_plugin.settings import PluginSettings


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
    parser.add_argument("--dry-run", action="store_true",
                        help="check the model, the mask and every argument (SGLang's own parser included), print "
                        "the server command, and exit without starting it")
    parser.add_argument("--allow-untested-sglang", action="store_true",
                        help=f"serve a mask, pruning or the recorder with an SGLang other than {TESTED_SGLANG_VERSION}; "
                        "every worker is still checked before the server serves")
    return parser


def prepare(argv: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Validate our arguments; return the full launch_server argument list and its environment."""
    args, passthrough = build_parser().parse_known_args(argv)
    settings = settings_from_cli(passthrough)
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
        if args.prune:
            check_load_time_prune(spec, mask.resolve(spec))
        print(f"easyep: {spec.describe()}; {summary}", file=sys.stderr)
    if pruned and pruned.needs_plugin:
        if any(a.startswith("--json-model-override-args") for a in passthrough):
            raise ValueError("--json-model-override-args cannot be combined with a plugin-served pruned checkpoint")
        ours += ["--json-model-override-args", json.dumps(pruned.source_overrides)]
        print(f"easyep: pruned checkpoint ({pruned.stock_engine} in stock engines), served in its source routing "
              f"space: {sum(map(len, pruned.keep.values()))} experts in {len(pruned.keep)} pruned layers", file=sys.stderr)
    if args.prune:
        prune_as, kept, kept_spec = "--prune", mask.resolve(spec), spec
    elif pruned and pruned.needs_plugin:
        prune_as, kept, kept_spec = "a plugin-served pruned checkpoint", pruned.keep, pruned.source_spec
    else:
        prune_as, kept, kept_spec = None, None, None
        if pruned:  # stock-exact: SGLang serves it unaided, but still splits its experts over the EP ranks
            check_expert_split(settings, tp_size=args.tp_size, spec=pruned.source_spec,
                               pruned="a pruned checkpoint", keep=pruned.keep)
    check_settings(settings, tp_size=args.tp_size, spec=kept_spec, pruned=prune_as, keep=kept,
                   masked=bool(args.mask or prune_as), record_stats=bool(args.record_stats), model_path=args.model_path)
    on_cpu = args.device == "cpu" or (args.device is None and not gpu_available())
    if on_cpu:
        check_cpu_settings(settings)
    plugin = PluginSettings(mask=Path(args.mask).resolve() if args.mask else None, prune=args.prune,
                            pruned_checkpoint=bool(pruned and pruned.needs_plugin),
                            stats_dir=Path(args.record_stats).resolve() if args.record_stats else None)
    setup = server_setup(plugin, on_cpu=on_cpu, tp_size=args.tp_size, local_ranks=ranks_per_node(settings, args.tp_size))
    if plugin.changes_the_model:
        check_plugin_will_run(setup.env, args.allow_untested_sglang)
    if args.device:
        ours += ["--device", args.device]
    return ours + passthrough + setup.cli_args(ours + passthrough), setup.env


def check_plugin_will_run(env: dict[str, str], allow_untested: bool) -> None:
    """Refuse what would leave the workers unmasked; the server checks each worker again before it serves."""
    allowed = env.get("SGLANG_PLUGINS")
    # An allowlist the operator set to keep code out of the server is not widened behind their back.
    if allowed and PLUGIN_NAME not in {name.strip() for name in allowed.split(",")}:
        raise ValueError(f"SGLANG_PLUGINS={allowed} leaves out the {PLUGIN_NAME} plugin, so no worker would apply the "
                         f"mask, pruning or recorder; set SGLANG_PLUGINS={allowed},{PLUGIN_NAME}")
    version = importlib.metadata.version("sglang")
    if version != TESTED_SGLANG_VERSION and not allow_untested:
        raise ValueError(f"SGLang {version} is installed; the plugin is tested with {TESTED_SGLANG_VERSION}. "
                         f"Install sglang=={TESTED_SGLANG_VERSION}, or pass --allow-untested-sglang")


def main(argv: list[str] | None = None) -> None:
    try:
        server_argv, env = prepare(argv)
        dry_run = build_parser().parse_known_args(argv)[0].dry_run
        if dry_run:
            check_server_arguments(server_argv)
    except (MaskError, ValueError, FileNotFoundError) as err:
        print(f"easyep: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    # SGLang's launch_server, in a process that stops the server when a worker fails to start (serve.py)
    command = [sys.executable, "-m", "easyep_sglang.sglang_plugin.serve", *server_argv]
    print("easyep: " + " ".join(command), file=sys.stderr, flush=True)
    if dry_run:
        print("easyep: dry run: every check passed; not starting the server", file=sys.stderr)
        return
    os.execve(sys.executable, command, env)  # same PID: whoever started us can stop the server
