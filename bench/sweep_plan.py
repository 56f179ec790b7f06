"""What a throughput sweep serves: the bench models, the configurations (mode x mask) with the weight bytes each
serves, and with --same-hardware the shape each is deployed in. Nothing here starts a server (bench.sweep does)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from bench.same_hardware import ALONE, SAME_HARDWARE, Hardware, Shape, smallest_shape
from easyep_sglang.mask import ExpertMask, MaskError
from easyep_sglang.plan import footprint, parse_bytes
from easyep_sglang.plan_shapes import checkpoint_weights
from easyep_sglang.spec import MoESpec, load_config

MODES = ("full", "masked", "prune_load", "prune_offline")


@dataclass(frozen=True)
class BenchModel:
    arch: str
    overrides: dict
    mem_fraction_static: float  # enough on a CPU host for weights plus the KV cache
    device_memory: str = ""  # --same-hardware's default: the full model needs TP=2, half its experts fit one device


# Random-weight DeepSeek-V3 checkpoints from easyep_sglang.demo_model. "expert-dominated" puts ~99% of
# its ~1.2 GB in routed experts (4 MoE layers x 128 experts x 3 x 512 x 768 bf16), so the memory a
# pruned checkpoint frees, and the bytes a decode step reads, are visible on a CPU.
BENCH_MODELS = {
    "tiny": BenchModel("deepseek_v3", {}, 0.2),
    "expert-dominated": BenchModel("deepseek_v3", dict(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=5, first_k_dense_replace=1,
        n_routed_experts=128, moe_intermediate_size=768, num_experts_per_tok=8, n_group=8, topk_group=4,
        num_attention_heads=8, num_key_value_heads=8,
    ), 0.3, "1GB"),
}


@dataclass(frozen=True)
class Launch:
    model_path: Path
    mask: Path | None = None
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServerConfig:
    mode: str
    experts: float  # routed experts kept per MoE layer (mean over layers)
    mask_path: Path | None
    weight_bytes: int  # served by this configuration: the full checkpoint unless pruned
    shape: Shape | None = None  # with --same-hardware: how its server is deployed
    layout: str | None = None  # with --same-hardware: SAME_HARDWARE, or ALONE (one replica, its own devices)

    def label(self) -> str:
        shape = f", {self.shape.describe()}{' alone' if self.layout == ALONE else ''}" if self.shape else ""
        return f"{self.mode} with {self.experts:g} experts{shape}"


def first_experts_mask(spec: MoESpec, keep: int) -> ExpertMask:
    """Keep `keep` experts per MoE layer: the first ids of each group, spread evenly (group g keeps
    keep // n_group, the first keep % n_group groups one more), so group-limited routing still reaches
    top_k kept experts. Raises MaskError (from ExpertMask.resolve) when no spread can."""
    if not spec.top_k <= keep <= spec.n_experts:
        raise MaskError(f"cannot keep {keep} experts: choose between top_k={spec.top_k} and {spec.n_experts}")
    base, extra = divmod(keep, spec.n_group)
    ids = [g * spec.group_size + i for g in range(spec.n_group) for i in range(base + (g < extra))]
    mask = ExpertMask.for_spec(spec, {layer: ids for layer in spec.moe_layers}, method=f"first-{keep}-per-layer",
                               provenance={"builder": "bench.sweep.first_experts_mask"})
    mask.resolve(spec)
    return mask


def build_bench_model(name: str, out_dir: Path) -> Path:
    from easyep_sglang.demo_model import build_tiny_model

    model = BENCH_MODELS[name]
    path = out_dir / "models" / name
    if not (path / "config.json").is_file():
        print(f"easyep: building the {name} bench model in {path}", file=sys.stderr, flush=True)
        build_tiny_model(model.arch, path, force=True, **model.overrides)
    return path


def plan_configs(args, spec: MoESpec, model_path: Path, out_dir: Path) -> list[ServerConfig]:
    masks = [ExpertMask.load(p) for p in args.mask_file]
    paths = list(args.mask_file)
    for keep in args.experts or ([] if masks else default_expert_counts(spec)):
        mask = first_experts_mask(spec, keep)
        path = out_dir / "masks" / f"first-{keep}.json"
        mask.save(path)
        masks.append(mask)
        paths.append(path)
    weights = checkpoint_weights(model_path)
    full = footprint(weights, spec, {})
    planned = [ServerConfig("full", spec.n_experts, None, full.served_bytes)] if "full" in args.modes else []
    served = [full] * len(planned)
    for mask, path in zip(masks, paths):
        resolved = mask.resolve(spec)  # every mask is checked before the first server starts
        experts = sum(len(resolved.get(l, range(spec.n_experts))) for l in spec.moe_layers) / len(spec.moe_layers)
        pruned = footprint(weights, spec, resolved)
        for mode in args.modes:
            if mode != "full":
                planned.append(ServerConfig(mode, experts, Path(path), (full if mode == "masked" else pruned).served_bytes))
                served.append(full if mode == "masked" else pruned)
    if not args.same_hardware:
        return planned
    config = load_config(model_path)
    hardware = same_hardware(args, config)
    configs = []
    for plain, fp in zip(planned, served):
        shape = smallest_shape(fp, config, spec, hardware)
        configs.append(replace(plain, shape=shape, layout=SAME_HARDWARE))
        if shape.replicas > 1:  # the part the replicas multiply: one of them, measured on its own
            configs.append(replace(plain, shape=shape.alone(), layout=ALONE))
    return configs


def device_memory(args) -> str:
    """--device-memory as given, else the bench model's default ("" when neither says)."""
    return args.device_memory or (BENCH_MODELS[args.bench_model].device_memory if args.bench_model else "")


def same_hardware(args, config: dict) -> Hardware:
    """--same-hardware's devices and their memory; the KV reserve defaults to what the sweep's longest setting
    holds at its concurrency."""
    memory = device_memory(args)
    if not memory:
        raise ValueError("--same-hardware needs --device-memory (e.g. 80GB, each device's memory for weights and KV)")
    if args.same_memory_budget or args.max_total_tokens:
        raise ValueError("--same-hardware sizes each shape's KV cache from --device-memory; drop --same-memory-budget "
                         "and --max-total-tokens")
    reserve = args.kv_reserve_tokens or args.concurrency * (scaled(max(args.inputs), args.scale)
                                                            + scaled(max(args.outputs), args.scale))
    kv_bytes = 4 if (config.get("torch_dtype") or config.get("dtype")) == "float32" else 2  # SGLang's auto: the model's
    return Hardware(args.same_hardware, parse_bytes(memory), reserve, kv_bytes)


def default_expert_counts(spec: MoESpec) -> list[int]:
    """The paper's 1/2 and 1/4 of the experts (128 and 64 of 256), where routing allows it."""
    counts = []
    for keep in (spec.n_experts // 2, spec.n_experts // 4):
        try:
            first_experts_mask(spec, keep)
            counts.append(keep)
        except MaskError:
            continue
    return counts


def measured_configs(args, configs: list[ServerConfig]) -> list[ServerConfig]:
    """All of them, or with --base-url the one its servers serve: with --same-hardware, as many URLs as the
    configuration's replicas (or one URL: one replica alone)."""
    if not args.base_url:
        return configs
    replicas = len(args.base_url)
    matching = [c for c in configs if c.shape is None or c.shape.replicas == replicas]
    if len(matching) != 1:
        raise ValueError(f"--base-url measures the configuration its {replicas} server(s) serve, but "
                         f"{len(matching)} planned configurations match ({', '.join(c.label() for c in configs)}); "
                         "give one --modes and at most one --experts or --mask-file: those they serve")
    return matching


def scaled(length: int, scale: float) -> int:
    return max(1, round(length * scale))
