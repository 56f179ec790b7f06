"""SGLang settings that a mode of the plugin cannot serve, refused before SGLang starts.

The settings are ServerArgs fields of SGLang 0.5.23, read from the launcher's pass-through arguments
(`settings_from_cli`, the flag spellings and aliases of `arg_groups/fields/*.py`) or given as
`sglang.Engine` keyword arguments. Settings inside an SGLang `--config` YAML file are not seen here.
"""

from __future__ import annotations

import argparse

from easyep_sglang.core.spec import MoESpec, load_config

OVERLAP_FIX = "drop --startup-weight-load-mode overlap (the default, serial, loads before the mask is applied)"
# MoE runner backends whose TopK hands the kernel raw router logits (TopKOutputFormat BYPASSED or
# TRITON_KERNEL, layers/moe/topk.py bind_runner_backend): the kernel picks the experts, so chosen ids never
# pass through the plugin's renumbering. "auto" is checked again when the model is loaded (expert_prune.py).
DRAFT_MODEL_ALGORITHMS = ("NEXTN", "EAGLE", "EAGLE3")  # SGLang's EAGLE worker family (NEXTN = EAGLE on the MTP layer)
KERNEL_ROUTING_BACKENDS = ("triton_kernel", "flashinfer_trtllm", "experimental_sgl_trtllm", "flashinfer_mxfp4")


def settings_from_cli(argv: list[str]) -> dict:
    """The ServerArgs fields the checks read, from launch_server arguments (others are ignored)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    parser.add_argument("--enable-eplb", action="store_true")
    parser.add_argument("--init-expert-location", default="trivial")
    parser.add_argument("--ep-dispatch-algorithm")
    parser.add_argument("--ep-num-redundant-experts", type=int, default=0)
    parser.add_argument("--ep-size", "--expert-parallel-size", "--ep", type=int)
    parser.add_argument("--moe-a2a-backend", default="none")
    parser.add_argument("--attn-dp-size", "--attention-data-parallel-size", type=int, default=1)
    parser.add_argument("--dp-size", "--data-parallel-size", type=int, default=1)
    parser.add_argument("--enable-dp-attention", action="store_true")
    parser.add_argument("--startup-weight-load-mode", default="serial")
    parser.add_argument("--moe-runner-backend", default="auto")
    parser.add_argument("--speculative-algorithm")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--pp-size", "--pipeline-parallel-size", type=int, default=1)
    try:
        settings, _ = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise ValueError(f"{err}; fix the SGLang argument") from None
    return vars(settings)


def ep_size_of(settings: dict, tp_size: int) -> int:
    """SGLang's expert-parallel width: every all-to-all backend spans EP over the TP group
    (`arg_groups/overrides.py`, `_a2a_ep_size`), else `--ep-size` (default 1)."""
    if settings.get("moe_a2a_backend") not in (None, "none"):
        return tp_size
    return settings.get("ep_size") or 1


def ranks_per_node(settings: dict, tp_size: int) -> int:
    """The schedulers SGLang starts on each node: DP replicas x TP x PP over --nnodes. DP attention splits the TP
    ranks instead of adding replicas (`dp_size * tp_size * pp_size` in `utils/numa_utils.py`, init_threads_binding)."""
    dp_attention = settings.get("enable_dp_attention") or (settings.get("attn_dp_size") or 1) > 1
    replicas = 1 if dp_attention else settings.get("dp_size") or 1
    return max(1, replicas * tp_size * (settings.get("pp_size") or 1) // (settings.get("nnodes") or 1))


def check_cpu_settings(settings: dict) -> None:
    """Refuse what SGLang 0.5.23 cannot run on a CPU with the launcher's work-arounds (server_env.py)."""
    algorithm = settings.get("speculative_algorithm") or ""
    if algorithm.upper() in DRAFT_MODEL_ALGORITHMS:
        # Measured: a DeepSeek NEXTN draft loads, then set_embed_and_head calls torch.cuda.synchronize()
        # (models/deepseek_v2.py:3448); past that, no EAGLE draft attention backend is torch_native
        # (speculative/draft_utils.py:64), and the draft tree needs sgl_kernel's CPU build (spec_tree.py:39).
        raise ValueError(f"--speculative-algorithm {algorithm} does not run on a CPU in SGLang 0.5.23 (its draft "
                         f"model needs GPU attention and kernels); drop --speculative-algorithm, or serve on a GPU")


def check_settings(settings: dict, *, tp_size: int, spec: MoESpec | None = None, pruned: str | None = None,
                   keep: dict[int, tuple[int, ...]] | None = None, masked: bool = False,
                   record_stats: bool = False, model_path=None) -> None:
    """Raise ValueError naming the flag to change.

    pruned: how the plugin serves only the kept experts ("--prune", "a plugin-served pruned checkpoint"),
    with `keep` the kept ids of each pruned layer; masked: the plugin changes routing (mask or pruning);
    model_path: the served checkpoint, whose quantization the recorder cannot read.
    """
    if settings.get("startup_weight_load_mode") == "overlap" and (masked or pruned or record_stats):
        # model_runner.finalize_startup_weight_load commits the real weights after load_model, over the
        # masked correction bias; 0.5.23 also admits no MoE architecture to overlap loading.
        raise ValueError(f"--startup-weight-load-mode overlap writes the weights after the easyep plugin has "
                         f"set up routing; {OVERLAP_FIX}")
    if settings.get("ep_dispatch_algorithm") == "fake" and (masked or pruned):
        # eplb/expert_location_dispatch.py transform_select_experts_inputs: random logits, correction bias zeroed
        raise ValueError("--ep-dispatch-algorithm fake routes tokens to random experts, masked ones included; "
                         "drop --ep-dispatch-algorithm fake")
    ep_size = ep_size_of(settings, tp_size)
    if pruned:
        _check_pruned(settings, tp_size, spec, pruned, keep or {})
    if record_stats:
        attn_dp = settings.get("attn_dp_size") or 1
        if attn_dp == 1 and settings.get("enable_dp_attention"):
            attn_dp = settings.get("dp_size") or 1  # the deprecated spelling of --attn-dp-size
        if attn_dp > 1:
            raise ValueError(f"--record-stats cannot record under DP attention (attention DP size {attn_dp}); "
                             f"calibrate with --attn-dp-size 1")
        if ep_size > 1:
            raise ValueError(f"--record-stats cannot record expert-parallel experts (EP size {ep_size}); "
                             f"calibrate without --ep-size and --moe-a2a-backend")
        if flag := _placement_flag(settings):
            # the TopK output the recorder reads already holds physical slot ids (select_experts)
            raise ValueError(f"--record-stats cannot record under {flag}: SGLang hands the recorder physical expert "
                             f"slots, not expert ids; calibrate without {flag}")
        quantization = (model_path and load_config(model_path).get("quantization_config")) or {}
        if quantization and not _fp8_blocks(quantization):
            raise ValueError(f"--record-stats recomputes bf16, fp32 or FP8 block-quantized experts; {model_path} is "
                             f"quantized ({quantization.get('quant_method')}, blocks "
                             f"{quantization.get('weight_block_size')}); calibrate a bf16 copy of the checkpoint")


def _fp8_blocks(quantization: dict) -> bool:
    """DeepSeek's FP8 release format: fp8 weights with a scale per square block (the recorder dequantizes it)."""
    block = quantization.get("weight_block_size")
    return quantization.get("quant_method") == "fp8" and bool(block) and len(block) == 2 and block[0] == block[1]


def _placement_flag(settings: dict) -> str | None:
    """The first flag given that makes SGLang place experts in physical slots (EPLB and its relatives)."""
    placement = [
        ("--enable-eplb", settings.get("enable_eplb")),
        ("--init-expert-location", settings.get("init_expert_location", "trivial") != "trivial"),
        ("--ep-dispatch-algorithm", settings.get("ep_dispatch_algorithm") is not None),
        ("--ep-num-redundant-experts", (settings.get("ep_num_redundant_experts") or 0) > 0),
    ]
    return next((flag for flag, given in placement if given), None)


def _check_pruned(settings: dict, tp_size: int, spec: MoESpec, pruned: str, keep: dict) -> None:
    if flag := _placement_flag(settings):
        # select_experts maps logical ids to physical slots before the plugin's AFTER hook maps
        # original ids to kept ones, so the id map would be applied to physical ids.
        raise ValueError(f"{pruned} cannot be served with {flag}: SGLang maps experts to physical slots "
                         f"before the plugin maps them to the kept experts; drop {flag}, or serve the full "
                         f"model with --mask alone")
    backend = settings.get("moe_runner_backend")
    if backend in KERNEL_ROUTING_BACKENDS:
        raise ValueError(f"{pruned} cannot be served with --moe-runner-backend {backend}, which picks experts inside "
                         f"its kernel where they cannot be renumbered; use --moe-runner-backend triton, or serve the "
                         f"full model with --mask alone")
    check_expert_split(settings, tp_size=tp_size, spec=spec, pruned=pruned, keep=keep)


def check_expert_split(settings: dict, *, tp_size: int, spec: MoESpec, pruned: str, keep: dict) -> None:
    """Expert parallelism over pruned layers (also a stock-served pruned checkpoint's): FusedMoE splits each
    layer's experts evenly over the EP ranks, and an all-to-all dispatcher sizes its buffer for one count."""
    ep_size = ep_size_of(settings, tp_size)
    if ep_size == 1:
        return
    for layer, ids in sorted(keep.items()):
        if len(ids) % ep_size:
            low = len(ids) - len(ids) % ep_size
            valid = [n for n in (low, low + ep_size) if spec.top_k <= n <= spec.n_experts]
            raise ValueError(
                f"layer {layer} keeps {len(ids)} experts, not a multiple of the expert-parallel size {ep_size} "
                f"that FusedMoE splits them over; keep {' or '.join(map(str, valid)) or 'another count of'} experts "
                f"in that layer (python -m easyep_sglang.select --multiple-of {ep_size}), or lower --ep-size"
            )
    backend = settings.get("moe_a2a_backend")
    counts = sorted({len(keep.get(layer, range(spec.n_experts))) for layer in spec.moe_layers})
    if backend not in (None, "none") and len(counts) > 1:
        # FusedMoE hands its expert count to the all-to-all dispatcher (fused_moe_triton/layer.py, MoeRunnerConfig),
        # and DeepEP sizes its one buffer per process by the first layer's count (token_dispatcher/deepep.py).
        raise ValueError(f"{pruned} cannot be served with --moe-a2a-backend {backend} while MoE layers hold different "
                         f"expert counts ({', '.join(map(str, counts))}): the dispatch buffer is sized once, for the "
                         f"first layer; keep the same count in every MoE layer (python -m easyep_sglang.select --keep M "
                         f"--multiple-of {ep_size}), or drop --moe-a2a-backend")
