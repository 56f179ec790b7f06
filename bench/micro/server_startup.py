"""What one SGLang server start costs on this machine: wall seconds to healthy, and the CPU seconds of its processes.

    python -m bench.micro.server_startup [--model-path DIR] [--rounds 2]

Starts the tiny Qwen3-MoE (built here) through our launcher, alternately with every SGLang model module
imported (SGLang's default) and with the unrelated ones skipped through SGLang's SGLANG_DISABLED_MODEL_ARCHS,
as the test suite does (tests/conftest.py). Server starts are the test suite's dominant cost.
"""

from __future__ import annotations

import argparse
import importlib.util
import pkgutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common.serving import cpu_seconds
from easyep_sglang.demo.tiny_models import build_tiny_model
from easyep_sglang.serving.server_process import LaunchedServer

SERVED_MODEL_MODULES = {"deepseek_v2", "deepseek_nextn", "qwen2_moe", "qwen3_moe"}  # sglang.srt.models.*


def other_model_modules() -> str:
    """SGLang's model modules other than those of the architectures this project serves, comma-separated."""
    models = importlib.util.find_spec("sglang.srt.models").submodule_search_locations
    return ",".join(m.name for m in pkgutil.iter_modules(models) if m.name not in SERVED_MODEL_MODULES)


def start_once(model: Path, env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds to healthy, CPU seconds the server's processes used by then)."""
    server = LaunchedServer(model, extra_args=["--dtype", "float32"], env=env, log_path=log)
    began = time.monotonic()
    try:
        server.start()
        return time.monotonic() - began, cpu_seconds(server.pids())
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro.server_startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", help="model to serve (default: a tiny Qwen3-MoE built in a temp dir)")
    parser.add_argument("--rounds", type=int, default=2, help="starts of each kind, alternating (default: 2)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="easyep-startup-") as tmp:
        model = Path(args.model_path) if args.model_path else build_tiny_model("qwen3_moe", Path(tmp) / "model",
                                                                               dtype="float32")
        kinds = {"all model modules": {"SGLANG_DISABLED_MODEL_ARCHS": ""},
                 "served model modules only": {"SGLANG_DISABLED_MODEL_ARCHS": other_model_modules()}}
        results = {kind: [] for kind in kinds}
        for round_index in range(args.rounds):
            for kind, env in kinds.items():
                results[kind].append(start_once(model, env, Path(tmp) / f"{round_index}-{len(results[kind])}.log"))
    for kind, runs in results.items():
        print(f"{kind}: median {statistics.median(w for w, _ in runs):.1f} s wall, "
              f"{statistics.median(c for _, c in runs):.1f} CPU-s ({len(runs)} starts)")


if __name__ == "__main__":
    main()
