"""Serve the embedded default: the trained demo MoE with its bundled math-domain expert mask.

    python -m easyep_sglang.demo [--port 30000] [any sglang.launch_server argument]

The model is the small DeepSeek-V3 MoE trained on math, code and prose by easyep_sglang.demo.trained,
shipped in easyep_sglang/data/demo_moe/. The mask keeps 16 of its 32 routed experts per MoE layer and
was made by the product's own pipeline from the shipped math statistics (provenance in both files):

    python -m easyep_sglang.calibrate --model-path easyep_sglang/data/demo_moe \\
        --prompts easyep_sglang/data/demo_sets/math_calib.jsonl --use-responses --domain math \\
        --out easyep_sglang/data/demo_stats_math.safetensors
    python -m easyep_sglang.select --stats easyep_sglang/data/demo_stats_math.safetensors --method easy_ep --keep 16 \\
        --model-path easyep_sglang/data/demo_moe --out easyep_sglang/data/demo_mask_math.json
"""

from __future__ import annotations

import argparse
from importlib.resources import files

from easyep_sglang.serving import launch

DEMO_MODEL = files("easyep_sglang") / "data" / "demo_moe"
DEMO_MASK = files("easyep_sglang") / "data" / "demo_mask_math.json"
SERVED_NAME = "easyep-demo"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m easyep_sglang.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Other arguments go to sglang.launch_server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    args, rest = parser.parse_known_args(argv)
    print(f"easyep: demo model {DEMO_MODEL}, mask {DEMO_MASK}\n"
          f"easyep: try  curl http://{args.host}:{args.port}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{SERVED_NAME}\", \"prompt\": \"Q: 37+48=? A:\", \"max_tokens\": 8, \"stop\": \"\\n\"}}'",
          flush=True)
    launch.main(["--model-path", str(DEMO_MODEL), "--mask", str(DEMO_MASK), "--served-model-name", SERVED_NAME,
                 "--host", args.host, "--port", str(args.port), *rest])
