"""Build only the kept experts of each restricted layer; memory for pruned experts is never allocated.

- `--prune` (load-time pruning): the original checkpoint's expert tensors are renumbered as they stream
  in and the pruned ones are skipped unread. No copy of the checkpoint is written.
- An offline-pruned checkpoint (checkpoint/pruned_checkpoint.py): its experts are already renumbered; its sliced
  router rows are scattered back to their original ids.

The router stays in the original expert space and the gate mask (gate_mask.py) removes the pruned
experts from it, so routing, group selection included, is identical to the masked full model for
any mask, groups split or not. The router is ~0.1% of a layer's weights. After top-k, the chosen
original ids are mapped to the new local ids through a device-resident table built at load time
(one gather of [T, top_k] per layer, CUDA-graph safe).
"""

from __future__ import annotations

import inspect
import logging

import torch

from easyep_sglang.checkpoint import tensor_names
from easyep_sglang.sglang_plugin import fail_closed
from easyep_sglang.sglang_plugin.serving_plan import ServingPlan, serving_plan

logger = logging.getLogger("easyep")

FUSED_MOE_INIT = "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.__init__"
LOAD_WEIGHTS = "sglang.srt.model_loader.loader.DefaultModelLoader.load_weights_only"
TOPK_FORWARD = "sglang.srt.layers.moe.topk.TopK.forward"
LOAD_MODEL = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"
ORIG_TO_NEW_ATTR = "easyep_orig_to_new"  # [E] int32 on TopK modules of pruned layers; -1 for pruned experts


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(FUSED_MOE_INIT, _build_kept_experts_only, HookType.AROUND)
    HookRegistry.register(LOAD_WEIGHTS, _renumber_expert_weights, HookType.AROUND)
    HookRegistry.register(LOAD_MODEL, _attach_id_maps, HookType.AFTER)
    HookRegistry.register(TOPK_FORWARD, _to_local_expert_ids, HookType.AFTER)


def _plan() -> ServingPlan:
    from sglang.srt.runtime_context import get_model

    return serving_plan(get_model().model_path)


def _build_kept_experts_only(original, moe, *args, **kwargs):
    from sglang.srt.layers.moe.utils import has_per_rank_fused_shared_slots
    from sglang.srt.runtime_context import get_flags, get_parallel

    bound = inspect.signature(original).bind(moe, *args, **kwargs)
    plan = _plan()
    spec, keep = plan.spec, plan.keep
    layer_id = bound.arguments["layer_id"]
    if layer_id in keep and not get_flags().moe.in_speculative_scope:
        # Shared-expert fusion puts the shared expert in slots after the routed ones (FusedMoE's weight loader).
        fused = bound.arguments.get("num_fused_shared_experts", 0)
        per_rank = fused and has_per_rank_fused_shared_slots(fused)
        shared_slots = fused * get_parallel().moe_ep_size if per_rank else fused
        if bound.arguments["num_experts"] != spec.n_experts + shared_slots:
            raise ValueError(f"layer {layer_id} has {bound.arguments['num_experts']} expert slots for {spec.n_experts} "
                             f"experts: --prune needs one slot per expert; drop EPLB's redundant experts")
        bound.arguments["num_experts"] = len(keep[layer_id]) + shared_slots
    return original(*bound.args, **bound.kwargs)


def _renumber_expert_weights(original, model, weights, target_device):
    plan = _plan()
    new_id = {layer: {orig: new for new, orig in enumerate(ids)} for layer, ids in plan.keep.items()}

    def kept_weights():
        for name, tensor in weights:
            if plan.pruned_on_disk:
                if (layer := tensor_names.router_layer(name)) in plan.keep:
                    full = tensor.new_zeros((plan.spec.n_experts, *tensor.shape[1:]))  # [E, ...]
                    full[list(plan.keep[layer])] = tensor
                    tensor = full
            elif (expert := tensor_names.expert_tensor(name)) and expert.layer in new_id:
                local = new_id[expert.layer].get(expert.expert)
                if local is None:
                    continue  # a pruned expert: never materialised
                name = expert.renumbered(local)
            yield name, tensor

    return original(model, kept_weights(), target_device)


def _attach_id_maps(_result, runner, *args, **kwargs) -> None:
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.moe.topk import TopK, TopKOutputFormat

    if runner.is_draft_worker:
        return
    plan = _plan()
    spec, keep = plan.spec, plan.keep
    device = next(runner.model.parameters()).device
    fused = {m.layer_id: m.num_fused_shared_experts for m in runner.model.modules() if isinstance(m, FusedMoE)}
    for module in runner.model.modules():
        if isinstance(module, TopK) and module.layer_id in keep:
            output_format = module.topk_config.output_format  # set when the MoE runner backend was bound
            if output_format not in (None, TopKOutputFormat.STANDARD):
                raise RuntimeError(f"the MoE runner backend routes inside its kernel ({output_format.name} top-k "
                                   "output), so pruned experts cannot be renumbered; serve with --moe-runner-backend "
                                   "triton, or with --mask alone")
            kept, shared = len(keep[module.layer_id]), fused.get(module.layer_id, 0)
            # The router writes a fused shared expert as id E + i; its slot follows the kept experts.
            orig_to_new = torch.full((spec.n_experts + shared,), -1, dtype=torch.int32)  # [E + shared]
            orig_to_new[list(keep[module.layer_id])] = torch.arange(kept, dtype=torch.int32)
            orig_to_new[spec.n_experts:] = torch.arange(kept, kept + shared, dtype=torch.int32)
            setattr(module, ORIG_TO_NEW_ATTR, orig_to_new.to(device))
            fail_closed.record_pruned([module.layer_id])
    kept = sum(len(ids) for ids in keep.values())
    source = "checkpoint pruned offline" if plan.pruned_on_disk else "pruned at load time"
    logger.info("easyep: %s: %d layers hold %d/%d experts", source, len(keep), kept, len(keep) * spec.n_experts)


def _to_local_expert_ids(topk_output, topk, *args, **kwargs):
    orig_to_new = getattr(topk, ORIG_TO_NEW_ATTR, None)
    if orig_to_new is None:
        return None
    topk_ids = topk_output.topk_ids  # [T, k]; -1 marks a padded row (EP, CUDA-graph padding), kept as -1
    local_ids = orig_to_new[topk_ids.clamp_min(0).long()].to(topk_ids.dtype)  # [T, k]
    return topk_output._replace(topk_ids=torch.where(topk_ids < 0, topk_ids, local_ids))
