"""SGLang's own command-line parser, to check the arguments the launcher would start SGLang with."""

from __future__ import annotations

import argparse


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(f"SGLang's launch_server refuses the arguments: {message}")


def check_server_arguments(argv: list[str]) -> None:
    """Parse `argv` as `python -m sglang.launch_server` would (flag names, choices, value types);
    raise ValueError with SGLang's message. ServerArgs' post-processing, which probes the hardware, is not run."""
    from sglang.srt.server_args import ServerArgs

    parser = _RaisingParser(prog="sglang.launch_server")
    ServerArgs.add_cli_args(parser)
    parser.parse_args(argv)
