"""Capacity planner: weight bytes before and after pruning, whether it fits, and the KV cache left.

    python -m easyep_sglang.plan --model-path M [--keep 128 64 | --mask m.json] --gpus 8 --gpu-mem 80GiB
    python -m easyep_sglang.plan --config config.json --keep 256 128 64 --gpus 8 --gpu-mem 141GB

Bytes come from the safetensors headers when weights are present (8-byte length + JSON header per
shard; no weight is read), else from the config's shapes and checkpoint dtype (FP8 with
quantization_config.weight_block_size: 1 byte per weight + one fp32 scale per block; routers,
embeddings, norms and the MTP projection stay in the model dtype, as in DeepSeek-V3/R1's release).

Memory model (per GPU, with N GPUs): budget = gpu_mem x mem_fraction; served weights split evenly over
the N GPUs (TP/EP); what is left holds KV cache. MLA (DeepSeek) stores (kv_lora_rank + qk_rope_head_dim)
values per token per layer on every GPU; GQA (Qwen) stores 2 x kv_heads x head_dim, split over up to
kv_heads GPUs. MTP/next-n layers are reported apart: SGLang loads them only as a speculative draft.

Same hardware: pruning pays on a GPU by changing the deployment shape. On the GPUs the full model needs, a
pruned model that fits fewer runs as data-parallel replicas; the table gives each expert count's shape and the
throughput ratio that follows from the replicas alone, as a prediction (each replica as fast as one full model).
Where the full model spans nodes, its TP crosses the network and its own throughput drops, which would add to
the ratio; that part is not predicted.

Calibration serves every expert (`calibrate`, `--record-stats`), so it needs the full model's GPUs; the plan
ends with them for the checkpoint as stored and, for an FP8 one, for a bf16 copy (2 bytes per weight, no
scales), in nodes of --gpus GPUs. The recorder adds one expert matrix in float32 per GPU for FP8 experts.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from easyep_sglang.checkpoint import tensor_names
from easyep_sglang.checkpoint.shapes import SCALE_SUFFIXES, Weight, checkpoint_weights, estimate_weights
from easyep_sglang.core.mask import ExpertMask, MaskError
from easyep_sglang.core.spec import MoESpec, load_config, spec_from_config

PARTS = ("dense", "router", "routed_experts", "mtp")  # dense = attention, embeddings, norms, dense/shared MLPs
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)
KV_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}
_UNITS = {"": 1 << 30, "gib": 1 << 30, "gb": 10**9, "mib": 1 << 20, "mb": 10**6, "tib": 1 << 40, "tb": 10**12}


def human(n: float, count: bool = False) -> str:
    """Decimal units: 1.2 GB, 34.5 MB; with count=True a number of parameters: 671.0B, 2.3M."""
    units = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)) if count else \
        ((" TB", 1e12), (" GB", 1e9), (" MB", 1e6), (" kB", 1e3))
    for name, size in units:
        if n >= size:
            return f"{n / size:,.1f}{name}"
    return f"{n:.0f}" if count else f"{n:.0f} B"


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 80GiB, 141GB or 80 (GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def classify(name: str, spec: MoESpec) -> tuple[str, int | None, int | None]:
    """(part, layer id, routed expert id) of a checkpoint tensor."""
    layer = tensor_names.layer_of(name)
    expert = tensor_names.expert_tensor(name)
    expert_id = expert.expert if expert else None
    if layer is not None and layer >= spec.num_layers:
        return "mtp", layer, expert_id
    if expert:
        return "routed_experts", layer, expert_id
    return ("router" if tensor_names.router_layer(name) is not None else "dense"), layer, None


@dataclass(frozen=True)
class Footprint:
    nbytes: dict[str, int]  # part -> bytes
    params: dict[str, int]  # part -> parameters (FP8 scales not counted)

    @property
    def served_bytes(self) -> int:
        return sum(v for k, v in self.nbytes.items() if k != "mtp")

    @property
    def served_params(self) -> int:
        return sum(v for k, v in self.params.items() if k != "mtp")


def footprint(weights: list[Weight], spec: MoESpec, keep: dict[int, tuple[int, ...]]) -> Footprint:
    """Bytes per part after keeping `keep[layer]` experts (layers not in `keep` keep all of them).
    Router rows (gate weight, correction bias) shrink with the experts, as the offline pruner slices them."""
    nbytes, params = dict.fromkeys(PARTS, 0), dict.fromkeys(PARTS, 0)
    for w in weights:
        part, layer, expert = classify(w.name, spec)
        kept = keep.get(layer)
        share = 1.0
        if kept is not None and expert is not None:
            share = float(expert in kept)
        elif kept is not None and tensor_names.router_layer(w.name) is not None:
            share = len(kept) / spec.n_experts
        nbytes[part] += round(w.nbytes * share)
        params[part] += round(w.numel * share)
    return Footprint(nbytes, params)


def kv_bytes_per_token(config: dict, spec: MoESpec, gpus: int, kv_bytes: int) -> int:
    """KV cache bytes one token takes on one GPU, over all served layers."""
    if "kv_lora_rank" in config:  # MLA: one latent per token, replicated on every TP rank
        return spec.num_layers * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * kv_bytes
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return spec.num_layers * 2 * math.ceil(kv_heads / min(gpus, kv_heads)) * head_dim * kv_bytes


@dataclass(frozen=True)
class Capacity:
    weights_per_gpu: int
    kv_tokens: int  # tokens of KV cache per GPU at the memory fraction (0 when weights do not fit)
    fits: bool


def capacity(fp: Footprint, config: dict, spec: MoESpec, gpus: int, gpu_mem: int, fraction: float,
             kv_bytes: int, min_kv_tokens: int) -> Capacity:
    per_gpu = math.ceil(fp.served_bytes / gpus)
    left = gpu_mem * fraction - per_gpu
    tokens = max(0, int(left // kv_bytes_per_token(config, spec, gpus, kv_bytes)))
    return Capacity(per_gpu, tokens, left > 0 and tokens >= min_kv_tokens)


def keep_sets(spec: MoESpec, keep_counts: list[int], mask_path: str | None) -> list[tuple[str, dict]]:
    """(label, {layer: kept ids}) per configuration to plan."""
    if mask_path:
        mask = ExpertMask.load(mask_path)
        resolved = mask.resolve(spec)
        mean = sum(len(resolved.get(l, range(spec.n_experts))) for l in spec.moe_layers) / len(spec.moe_layers)
        return [(f"{mean:g} (mask {mask.digest()[7:15]})", resolved)]
    out = []
    for count in keep_counts or [spec.n_experts]:
        if not spec.top_k <= count <= spec.n_experts:
            raise ValueError(f"--keep {count}: keep between top_k={spec.top_k} and {spec.n_experts} experts per layer")
        out.append((str(count), {l: tuple(range(count)) for l in spec.moe_layers} if count < spec.n_experts else {}))
    return out


def plan_table(config: dict, weights: list[Weight], source: str, args) -> str:
    spec = spec_from_config(config)
    gpu_mem, kv_bytes = parse_bytes(args.gpu_mem), KV_DTYPE_BYTES[args.kv_cache_dtype]
    lines = [
        f"{spec.describe()}; bytes from {source}; decimal units (GB = 10^9 bytes).",
        f"Budget per GPU: {args.gpu_mem} x {args.mem_fraction}; KV cache {args.kv_cache_dtype}; "
        f"'fits' needs >= {args.min_kv_tokens} KV tokens per GPU.",
        "",
        f"| experts/layer | routed experts | router | dense | served | params | "
        f"per GPU ({args.gpus} GPUs) | fits {args.gpus} x {args.gpu_mem} | KV tokens/GPU | min GPUs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    last, shapes = None, []
    for label, keep in keep_sets(spec, args.keep, args.mask):
        fp = footprint(weights, spec, keep)
        cap = capacity(fp, config, spec, args.gpus, gpu_mem, args.mem_fraction, kv_bytes, args.min_kv_tokens)
        smallest = min_gpus(fp, config, spec, args)
        shapes.append((label, smallest))
        lines.append(
            f"| {label} | {human(fp.nbytes['routed_experts'])} | {human(fp.nbytes['router'])} | "
            f"{human(fp.nbytes['dense'])} | {human(fp.served_bytes)} | {human(fp.served_params, count=True)} | "
            f"{human(cap.weights_per_gpu)} | "
            f"{'yes' if cap.fits else 'no'} | {cap.kv_tokens:,} | {smallest or f'> {GPU_COUNTS[-1]}'} |"
        )
        last = fp
    if last and last.nbytes["mtp"]:
        lines += ["", f"MTP/next-n layers (loaded only as a speculative draft, not pruned): "
                  f"{human(last.nbytes['mtp'])}, {human(last.params['mtp'], count=True)} params."]
    full_gpus = min_gpus(footprint(weights, spec, {}), config, spec, args)
    return "\n".join(lines + ["", *same_hardware_lines(shapes, full_gpus, args.gpus), "",
                               *calibration_lines(config, weights, spec, args)])


def min_gpus(fp: Footprint, config: dict, spec: MoESpec, args) -> int | None:
    """The fewest GPUs (of GPU_COUNTS) that hold `fp` with the KV cache asked for; None past the last."""
    gpu_mem, kv_bytes = parse_bytes(args.gpu_mem), KV_DTYPE_BYTES[args.kv_cache_dtype]
    return next((g for g in GPU_COUNTS if capacity(fp, config, spec, g, gpu_mem, args.mem_fraction, kv_bytes,
                                                   args.min_kv_tokens).fits), None)


def same_hardware_lines(shapes: list[tuple[str, int | None]], full_gpus: int | None, gpus_per_node: int) -> list[str]:
    """Each configuration deployed on the full model's GPUs: GPUs per replica, replicas, predicted ratio."""
    if full_gpus is None:
        return [f"Same hardware: the full model does not fit {GPU_COUNTS[-1]} GPUs."]
    nodes = math.ceil(full_gpus / gpus_per_node)
    lines = [f"Same hardware, the full model's {full_gpus} GPUs ({nodes} node(s) of {gpus_per_node}); "
             "throughput predicted from the replicas alone:", "",
             "| experts/layer | GPUs per replica | replicas | predicted throughput / full |", "|---|---|---|---|"]
    for label, gpus in shapes:
        if gpus is None or gpus > full_gpus:
            lines.append(f"| {label} | more than {full_gpus} | 0 | - |")
            continue
        spans = " (TP across nodes)" if gpus > gpus_per_node else ""
        lines.append(f"| {label} | {gpus}{spans} | {full_gpus // gpus} | {full_gpus // gpus:.2f} (predicted) |")
    if nodes > 1:
        lines += ["", f"The full model's TP crosses nodes; its own throughput is below one node's, which would "
                      f"raise every ratio above (not predicted)."]
    return lines


def calibration_lines(config: dict, weights: list[Weight], spec: MoESpec, args) -> list[str]:
    """What calibrating needs: every expert served, for the checkpoint as stored and, if FP8, a bf16 copy."""
    fp8 = any(w.name.endswith(SCALE_SUFFIXES) for w in weights)
    stored = [("as stored (FP8)" if fp8 else "as stored", weights)]
    if fp8:  # an FP8 weight holds 1 byte per parameter; its copy 2, and no scales
        stored.append(("a bf16 copy", [Weight(w.name, 2 * w.numel if w.nbytes == w.numel else w.nbytes, w.numel)
                                      for w in weights if not w.name.endswith(SCALE_SUFFIXES)]))
    lines = ["Calibration serves every expert (TP over all its GPUs; --nnodes past one node):"]
    for label, ws in stored:
        fp = footprint(ws, spec, {})
        gpus = min_gpus(fp, config, spec, args)
        where = (f"{gpus} GPUs, {math.ceil(gpus / args.gpus)} node(s) of {args.gpus} x {args.gpu_mem}" if gpus
                 else f"more than {GPU_COUNTS[-1]} GPUs")
        lines.append(f"- calibrating {label}: {human(fp.served_bytes)} of weights; {where}")
    if fp8 and "moe_intermediate_size" in config:  # one expert's w13 [2I/tp, H] in float32, at the smallest TP
        lines.append(f"- the recorder dequantizes one FP8 expert matrix at a time: at most "
                     f"{human(2 * config['moe_intermediate_size'] * config['hidden_size'] * 4)} per GPU (TP=1), "
                     f"divided by the TP size")
    return lines


def load_weights(args) -> tuple[dict, list[Weight], str]:
    if args.model_path:
        config = load_config(args.model_path)
        weights = checkpoint_weights(args.model_path)
        if weights:
            return config, weights, f"the safetensors headers in {args.model_path}"
    else:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; --config takes a config.json file")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    return config, estimate_weights(config), "config shapes (no weights present)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m easyep_sglang.plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-path", help="local model directory (safetensors headers are read if present)")
    source.add_argument("--config", help="a config.json alone: bytes estimated from shapes and dtype")
    pruning = parser.add_mutually_exclusive_group()
    pruning.add_argument("--keep", type=int, nargs="+", default=[], help="experts kept per MoE layer; one row each")
    pruning.add_argument("--mask", help="an expert mask JSON (per-layer counts)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs to check the fit on (default: 8)")
    parser.add_argument("--gpu-mem", default="80GiB", help="memory per GPU, e.g. 80GiB, 141GB (default: 80GiB)")
    parser.add_argument("--mem-fraction", type=float, default=0.9, help="SGLang --mem-fraction-static (default: 0.9)")
    parser.add_argument("--kv-cache-dtype", choices=sorted(KV_DTYPE_BYTES), default="bf16", help="(default: bf16)")
    parser.add_argument("--min-kv-tokens", type=int, default=32768,
                        help="KV tokens per GPU needed to call it a fit (default: 32768, one long reasoning trace)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        config, weights, source = load_weights(args)
        print(plan_table(config, weights, source, args))
    except (MaskError, ValueError, FileNotFoundError, KeyError) as err:
        print(f"easyep: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
