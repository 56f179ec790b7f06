"""Serve the embedded default: the tiny DeepSeek-V3 demo model with its bundled expert mask.

    python -m easyep_sglang.demo [--port 30000] [any sglang.launch_server argument]

The model is built offline on first use (deterministic, a few seconds) into a cache folder.
"""

from __future__ import annotations

import argparse
import os
from importlib.resources import files
from pathlib import Path

from easyep_sglang import launch
from easyep_sglang.demo_model import build_tiny_model

DEMO_ARCH = "deepseek_v3"
DEMO_MASK = files("easyep_sglang") / "data" / "demo_mask_deepseek_v3.json"


def demo_model_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "easyep_sglang"
    model = cache / f"demo-{DEMO_ARCH}"
    if not (model / "config.json").is_file():
        build_tiny_model(DEMO_ARCH, model, force=True)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m easyep_sglang.demo", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments go to sglang.launch_server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    args, rest = parser.parse_known_args(argv)
    model = demo_model_dir()
    print(f"easyep: demo model {model}, mask {DEMO_MASK}\n"
          f"easyep: try  curl http://{args.host}:{args.port}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{model}\", \"prompt\": \"Q: 2+3=? A:\", \"max_tokens\": 16}}'", flush=True)
    launch.main(["--model-path", str(model), "--mask", str(DEMO_MASK),
                 "--host", args.host, "--port", str(args.port), *rest])


if __name__ == "__main__":
    main()
