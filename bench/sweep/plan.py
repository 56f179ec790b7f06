"""What a throughput sweep serves: its options (SweepConfig), the bench models, the configurations (mode x mask)
with the weight bytes each serves, with --same-hardware the shape each is deployed in, and the launcher flags of a
bench server. Nothing here starts a server (bench.sweep.run does)."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from bench.sweep.same_hardware import ALONE, SAME_HARDWARE, Hardware, Shape, smallest_shape
from easyep_sglang.checkpoint.capacity import footprint, parse_bytes
from easyep_sglang.checkpoint.shapes import checkpoint_weights
from easyep_sglang.core.mask import ExpertMask, MaskError
from easyep_sglang.core.spec import MoESpec, load_config
from easyep_sglang.sglang_plugin.server_env import gpu_available

MODES = ("full", "masked", "prune_load", "prune_offline")
NO_TOKEN_CAP = "1000000000"  # lifts the launcher's CPU --max-total-tokens cap: the memory fraction decides


@dataclass(frozen=True)
class BenchModel:
    arch: str
    overrides: dict
    mem_fraction_static: float  # enough on a CPU host for weights plus the KV cache
    device_memory: str = ""  # --same-hardware's default: the full model needs TP=2, half its experts fit one device


# Random-weight DeepSeek-V3 checkpoints from easyep_sglang.demo.tiny_models. "expert-dominated" puts ~99% of
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
class SweepConfig:
    """One sweep: the API of bench.sweep.run; every flag of its parser maps onto the field of its name.
    Exactly one of model_path and bench_model names the model."""
    model_path: str | Path | None = None
    bench_model: str | None = None  # a BENCH_MODELS name
    experts: tuple[int, ...] = ()  # one masked configuration each; none and no mask_file: 1/2 and 1/4 of the experts
    mask_file: tuple[str, ...] = ()
    modes: tuple[str, ...] = ("full", "masked")
    inputs: tuple[int, ...] = (1024, 4096)  # nominal lengths, times scale
    outputs: tuple[int, ...] = (1024, 4096)
    scale: float = 1.0
    rounds: int = 1
    concurrency: int = 32  # the paper's
    num_prompts: int = 0  # 0: 2 x concurrency
    same_memory_budget: bool = False
    mem_fraction_static: float | None = None  # None: the bench model's on a CPU
    max_total_tokens: int | None = None
    omp_threads: int | None = None
    server_args: str = ""  # more launcher/SGLang flags, quoted
    startup_timeout: float = 600
    same_hardware: int | None = None  # devices
    device_memory: str | None = None
    replicas_as: str = "servers"  # or "dp"
    kv_reserve_tokens: int | None = None
    base_url: tuple[str, ...] = ()  # running servers to measure instead of starting them
    sweep_id: str | None = None
    first_round: int = 0
    dry_run: bool = False
    out_dir: str | Path = "runs/sweep"

    def __post_init__(self):
        if (self.model_path is None) == (self.bench_model is None):
            raise ValueError("give one of --model-path and --bench-model")


def launcher_flags(mem_fraction_static: float | None, server_args: str,
                   max_total_tokens: int | str | None = None) -> list[str]:
    """The launcher flags of a bench server: its static memory fraction and KV token cap (None: the launcher's
    own), then the user's quoted --server-args."""
    flags = [] if mem_fraction_static is None else ["--mem-fraction-static", str(mem_fraction_static)]
    flags += [] if max_total_tokens is None else ["--max-total-tokens", str(max_total_tokens)]
    return flags + shlex.split(server_args)


def server_flags(sweep: SweepConfig) -> list[str]:
    """Flags every server of the sweep gets. On a CPU the launcher's own 0.05 fraction fails when other
    processes take memory while the server starts, so a CPU run gets the bench model's fraction."""
    fraction = sweep.mem_fraction_static or BENCH_MODELS[sweep.bench_model or "tiny"].mem_fraction_static
    if sweep.mem_fraction_static is None and sweep.model_path and gpu_available():
        fraction = None  # SGLang's own choice, which depends on the GPU only: the same for every config
    # --same-memory-budget: freed expert memory becomes KV cache, as on a GPU at a fixed fraction
    cap = NO_TOKEN_CAP if sweep.same_memory_budget else sweep.max_total_tokens or None
    return launcher_flags(fraction, sweep.server_args, cap)


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
                               provenance={"builder": "bench.sweep.plan.first_experts_mask"})
    mask.resolve(spec)
    return mask


def build_bench_model(name: str, out_dir: Path) -> Path:
    from easyep_sglang.demo.tiny_models import build_tiny_model

    model = BENCH_MODELS[name]
    path = out_dir / "models" / name
    if not (path / "config.json").is_file():
        print(f"easyep: building the {name} bench model in {path}", file=sys.stderr, flush=True)
        build_tiny_model(model.arch, path, force=True, **model.overrides)
    return path


def plan_configs(sweep: SweepConfig, spec: MoESpec, model_path: Path, out_dir: Path) -> list[ServerConfig]:
    masks = [ExpertMask.load(p) for p in sweep.mask_file]
    paths = list(sweep.mask_file)
    for keep in sweep.experts or ([] if masks else default_expert_counts(spec)):
        mask = first_experts_mask(spec, keep)
        path = out_dir / "masks" / f"first-{keep}.json"
        mask.save(path)
        masks.append(mask)
        paths.append(path)
    weights = checkpoint_weights(model_path)
    full = footprint(weights, spec, {})
    planned = [ServerConfig("full", spec.n_experts, None, full.served_bytes)] if "full" in sweep.modes else []
    served = [full] * len(planned)
    for mask, path in zip(masks, paths):
        resolved = mask.resolve(spec)  # every mask is checked before the first server starts
        experts = sum(len(resolved.get(l, range(spec.n_experts))) for l in spec.moe_layers) / len(spec.moe_layers)
        pruned = footprint(weights, spec, resolved)
        for mode in sweep.modes:
            if mode != "full":
                planned.append(ServerConfig(mode, experts, Path(path), (full if mode == "masked" else pruned).served_bytes))
                served.append(full if mode == "masked" else pruned)
    if not sweep.same_hardware:
        return planned
    config = load_config(model_path)
    hardware = same_hardware(sweep, config)
    configs = []
    for plain, fp in zip(planned, served):
        shape = smallest_shape(fp, config, spec, hardware)
        configs.append(replace(plain, shape=shape, layout=SAME_HARDWARE))
        if shape.replicas > 1:  # the part the replicas multiply: one of them, measured on its own
            configs.append(replace(plain, shape=shape.alone(), layout=ALONE))
    return configs


def device_memory(sweep: SweepConfig) -> str:
    """--device-memory as given, else the bench model's default ("" when neither says)."""
    return sweep.device_memory or (BENCH_MODELS[sweep.bench_model].device_memory if sweep.bench_model else "")


def same_hardware(sweep: SweepConfig, config: dict) -> Hardware:
    """--same-hardware's devices and their memory; the KV reserve defaults to what the sweep's longest setting
    holds at its concurrency."""
    memory = device_memory(sweep)
    if not memory:
        raise ValueError("--same-hardware needs --device-memory (e.g. 80GB, each device's memory for weights and KV)")
    if sweep.same_memory_budget or sweep.max_total_tokens:
        raise ValueError("--same-hardware sizes each shape's KV cache from --device-memory; drop --same-memory-budget "
                         "and --max-total-tokens")
    reserve = sweep.kv_reserve_tokens or sweep.concurrency * (scaled(max(sweep.inputs), sweep.scale)
                                                            + scaled(max(sweep.outputs), sweep.scale))
    kv_bytes = 4 if (config.get("torch_dtype") or config.get("dtype")) == "float32" else 2  # SGLang's auto: the model's
    return Hardware(sweep.same_hardware, parse_bytes(memory), reserve, kv_bytes)


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


def measured_configs(sweep: SweepConfig, configs: list[ServerConfig]) -> list[ServerConfig]:
    """All of them, or with --base-url the one its servers serve: with --same-hardware, as many URLs as the
    configuration's replicas (or one URL: one replica alone)."""
    if not sweep.base_url:
        return configs
    replicas = len(sweep.base_url)
    matching = [c for c in configs if c.shape is None or c.shape.replicas == replicas]
    if len(matching) != 1:
        raise ValueError(f"--base-url measures the configuration its {replicas} server(s) serve, but "
                         f"{len(matching)} planned configurations match ({', '.join(c.label() for c in configs)}); "
                         "give one --modes and at most one --experts or --mask-file: those they serve")
    return matching


def scaled(length: int, scale: float) -> int:
    return max(1, round(length * scale))
