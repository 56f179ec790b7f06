"""Apply an expert mask at gating time, once, right after the model's weights are loaded.

- Sigmoid routers with a correction bias (DeepSeek-V3/R1, noaux_tc): the pruned experts' bias is
  set to PRUNED_BIAS. Their choice score is then far below any kept expert's, so they lose the
  group ranking (top-2 sum) and the top-k on every kernel path, GPU kernels and CUDA graphs
  included, at no per-step cost. Finite, so group sums stay free of NaN.
- Softmax routers (Qwen2/3-MoE, DeepSeek-V2): a device-resident bool mask built at load time;
  the router logits of pruned experts become -inf before top-k (one masked_fill per layer).
"""

from __future__ import annotations

import logging

import torch

from easyep_sglang.core.routing import PRUNED_BIAS
from easyep_sglang.core.spec import ROUTER_SIGMOID_BIAS, MoESpec
from easyep_sglang.sglang_plugin import fail_closed
from easyep_sglang.sglang_plugin.serving_plan import serving_plan

logger = logging.getLogger("easyep")

LOAD_MODEL = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"
TOPK_FORWARD = "sglang.srt.layers.moe.topk.TopK.forward"
PRUNED_ATTR = "easyep_pruned"  # [E] bool, True for pruned experts; set on TopK modules of softmax routers


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(LOAD_MODEL, _after_load_model, HookType.AFTER)
    HookRegistry.register(TOPK_FORWARD, _mask_router_logits, HookType.BEFORE)


def _after_load_model(_result, runner, *args, **kwargs) -> None:
    plan = serving_plan(runner.model_config.model_path)
    spec, keep = plan.spec, plan.keep
    layer_offset = spec.num_layers if runner.is_draft_worker else 0  # the MTP draft model numbers its layer 0
    applied = apply_mask(runner.model, spec, keep, layer_offset)
    expected = {l for l in keep if (l in spec.mtp_layers) == bool(runner.is_draft_worker)}
    if expected - set(applied):
        raise RuntimeError(f"easyep: mask names layers {sorted(expected - set(applied))} but the model has no router there")
    kept = sum(len(keep.get(l, range(spec.n_experts))) for l in applied)
    fail_closed.record_mask(keep, applied, kept)
    how = f"correction bias {PRUNED_BIAS:g}" if spec.router == ROUTER_SIGMOID_BIAS else "-inf router logits"
    logger.info(
        "easyep: mask on %d layers, %d/%d experts kept (%s)%s",
        len(applied), kept, len(applied) * spec.n_experts, how, expert_placement_note(),
    )


def expert_placement_note() -> str:
    """With EPLB or a non-trivial expert placement, SGLang still places every logical expert."""
    from sglang.srt.layers.moe.topk import is_expert_remapping_enabled
    from sglang.srt.runtime_context import get_exec

    if not is_expert_remapping_enabled() and get_exec().moe.ep_dispatch_algorithm is None:
        return ""
    return "; expert placement (EPLB) is on: masked experts are never chosen but still occupy physical expert slots"


def apply_mask(model: torch.nn.Module, spec: MoESpec, keep: dict[int, tuple[int, ...]], layer_offset: int = 0) -> list[int]:
    """Mark pruned experts in every TopK of `model`; return the layer ids that were restricted."""
    from sglang.srt.layers.moe.topk import TopK

    applied = []
    for module in model.modules():
        if not isinstance(module, TopK):
            continue
        layer_id = module.layer_id + layer_offset
        if layer_id not in keep:
            continue
        pruned = torch.ones(spec.n_experts, dtype=torch.bool)  # [E]
        pruned[list(keep[layer_id])] = False
        if spec.router == ROUTER_SIGMOID_BIAS:
            bias = module.topk_config.correction_bias  # [E], shared with the gate's parameter
            assert bias is not None and bias.shape[0] == spec.n_experts, f"layer {layer_id}: no correction bias"
            with torch.no_grad():
                bias[pruned.to(bias.device)] = PRUNED_BIAS
        else:
            device = next(model.parameters()).device
            setattr(module, PRUNED_ATTR, pruned.to(device))
        applied.append(layer_id)
    return applied


def _mask_router_logits(topk, hidden_states, router_logits, *args, **kwargs):
    pruned = getattr(topk, PRUNED_ATTR, None)
    if pruned is None:
        return None
    return (topk, hidden_states, router_logits.masked_fill(pruned, float("-inf")), *args), kwargs
