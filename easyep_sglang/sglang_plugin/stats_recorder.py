"""Record EASY-EP calibration statistics inside SGLang's worker, during prefill.

Installed by `load_plugin` only when PluginSettings.stats_dir is set (launcher: `--record-stats DIR`). For
each MoE layer and each token t of a recorded forward, with x_t the MoE input (after the norm) and
h_t the residual entering the MoE sublayer (before the norm):

    g[i,t] = applied gate weight of chosen expert i: TopK's weight x routed_scaling_factor,
             unless TopK applied the factor itself (topk_config.apply_routed_scaling_factor_on_output)
    e[i,t] = W2_i (silu(W1_i x_t) * W3_i x_t), recomputed for the chosen experts only, from the
             FusedMoE weights (w13 [E, 2I/tp, H], gate rows first; w2 [E, H, I/tp]); under TP the
             partial sums are all-reduced over the MoE-TP group before any norm is taken. FP8
             block-quantized experts (Fp8MoEMethod, DeepSeek-R1 as released) are dequantized one chosen
             expert at a time, one matrix at a time, and e computed in float32: the extra memory is one
             expert matrix in float32 (w13: 4/3 of one expert's bf16 weights), never a layer
    r_t    = sum_i g[i,t] e[i,t]  (shared experts excluded)
    s_t    = max(0, 1 - cos(h_t, h_t + r_t))

and `ExpertStats.update` adds them to float64 [L, E] sums on the model's device (TP rank 0 only).

Recorded: ForwardMode EXTEND and SPLIT_PREFILL, i.e. prefill. Not recorded: decode, target-verify
(speculative tokens under check), idle, draft workers. A chunked prefill counts each token once,
since every chunk extends over new tokens only; tokens served from the prefix cache are not computed
and so not counted (the calibration driver flushes the cache and checks `cached_tokens == 0`).

Control goes through SGLang's own expert-distribution endpoints, so no new endpoint is needed:
    /start_expert_distribution_record   reset the sums and start recording
    /stop_expert_distribution_record    stop
    /dump_expert_distribution_record    TP rank 0 writes DIR/easyep_stats_<unix time ns>.safetensors
SGLang's own recorder is still driven when `--expert-distribution-recorder-mode` is set.

Not supported yet, refused at load time with the fix named: quantized experts other than FP8 with square
blocks, expert parallelism, DP attention, pipeline parallelism, mixed chunks, re-laid-out expert weights
(AMX, DeepGEMM's UE8M0 scales, some GPU MoE backends), kernels that route inside the MoE kernel. Calibrate
with TP and bf16/fp32 or FP8 block-quantized weights.
"""

from __future__ import annotations

import functools
import logging
import pkgutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from easyep_sglang.checkpoint import fp8_blocks
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.core.stats import ExpertStats
from easyep_sglang.sglang_plugin import fail_closed
from easyep_sglang.sglang_plugin.cpu_fp8 import STAND_IN_ATTR
from easyep_sglang.sglang_plugin.settings import PluginSettings

logger = logging.getLogger("easyep")

LOAD_MODEL = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"
TOPK_FORWARD = "sglang.srt.layers.moe.topk.TopK.forward"
MOE_BLOCK_FORWARDS = (
    "sglang.srt.models.deepseek_v2.DeepseekV2MoE.forward",
    "sglang.srt.models.qwen3_moe.Qwen3MoeSparseMoeBlock.forward",
    "sglang.srt.models.qwen2_moe.Qwen2MoeSparseMoeBlock.forward",
)
EXPERT_DISTRIBUTION_HANDLE = "sglang.srt.managers.scheduler.Scheduler.expert_distribution_handle"
BLOCK_ATTR = "easyep_stats_block"  # _Block, on each recorded MoE block of the target model
CALL_ATTR = "easyep_stats_call"  # _Call, on the block's TopK while the block runs a recorded forward
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
DUMP_GLOB = "easyep_stats_*.safetensors"  # * = unix time in ns


class _Block(NamedTuple):
    row: int  # ExpertStats row of this MoE layer
    gate_scale: float  # factor from TopK's weights to the applied weights g


class _Call(NamedTuple):
    block: _Block
    experts: torch.nn.Module  # FusedMoE
    residual: torch.Tensor  # [T, H] h


@dataclass
class _Recorder:
    stats: ExpertStats
    provenance: dict
    top_k: int
    moe_tp_size: int
    accumulate: bool  # TP rank 0; the other ranks only join the all-reduce
    fp8_block: int | None  # block size of FP8 block-quantized experts; None for bf16/fp32 ones
    recording: bool = False

    def control(self, action: str) -> None:
        if action == "START_RECORD":
            self.stats.sums.zero_()
            self.stats.tokens.zero_()
            self.recording = True
        elif action == "STOP_RECORD":
            self.recording = False
        elif action == "DUMP_RECORD" and self.accumulate:
            path = PluginSettings.from_env().stats_dir / DUMP_GLOB.replace("*", str(time.time_ns()))
            try:
                self.stats.save(path, self.provenance)  # atomic: written beside, then renamed
            except OSError as err:  # the server keeps serving; the driver reports the missing file
                logger.error("easyep: could not write calibration statistics to %s: %s", path, err)
                return
            logger.info("easyep: wrote calibration statistics of %d tokens to %s", int(self.stats.tokens.max()), path)


_recorder: _Recorder | None = None


@functools.cache  # once per process, however often the plugin is loaded
def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(LOAD_MODEL, _after_load_model, HookType.AFTER)
    HookRegistry.register(TOPK_FORWARD, _after_topk, HookType.AFTER)
    for target in MOE_BLOCK_FORWARDS:
        HookRegistry.register(target, _around_moe_block, HookType.AROUND)
    HookRegistry.register(EXPERT_DISTRIBUTION_HANDLE, _around_expert_distribution_handle, HookType.AROUND)


def _after_load_model(_result, runner, *args, **kwargs) -> None:
    global _recorder
    if runner.is_draft_worker:  # the draft model (MTP/EAGLE) is not calibrated
        return
    spec = spec_from_model_path(runner.model_config.model_path)
    block_classes = tuple(pkgutil.resolve_name(target.rsplit(".", 1)[0]) for target in MOE_BLOCK_FORWARDS)
    blocks = [m for m in runner.model.modules() if isinstance(m, block_classes)]
    stats = ExpertStats.zeros(spec, device=blocks[0].experts.w13_weight.device if blocks else "cpu")
    problems = _unsupported(runner.server_args, blocks, spec.n_experts)
    missing = sorted(set(spec.moe_layers) - {m.layer_id for m in blocks})
    if missing:
        problems.append(f"no recordable MoE block for layers {missing} (pipeline parallelism is not supported)")
    if problems:
        raise RuntimeError("easyep: cannot record calibration statistics: " + "; ".join(problems))
    for block in blocks:
        config = block.topk.topk_config
        fused = config.apply_routed_scaling_factor_on_output or config.routed_scaling_factor is None
        setattr(block, BLOCK_ATTR, _Block(stats.index_of(block.layer_id), 1.0 if fused else config.routed_scaling_factor))
    experts = blocks[0].experts
    import sglang

    provenance = {
        "model": spec.identity(),
        "model_path": str(runner.model_config.model_path),
        "sglang_version": sglang.__version__,
        "dtype": str(runner.model_config.dtype).removeprefix("torch."),  # of the arithmetic
        "expert_weights": str(experts.w13_weight.dtype).removeprefix("torch."),
        "tp_size": experts.moe_tp_size,
        "recorder": __name__,
    }
    _recorder = _Recorder(stats, provenance, spec.top_k, experts.moe_tp_size, accumulate=experts.moe_tp_rank == 0,
                          fp8_block=fp8_block_size(experts))
    fail_closed.report().recorder = True
    logger.info("easyep: calibration recorder on %d MoE layers (TP rank %d), dumps to %s",
                len(blocks), experts.moe_tp_rank, PluginSettings.from_env().stats_dir)


def _unsupported(server_args, blocks, n_experts: int) -> list[str]:
    from sglang.srt.layers.moe.topk import TopKOutputFormat
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.utils.common import use_intel_amx_backend

    problems = []
    if get_parallel().attn_dp_enabled:  # resolved; the raw enable_dp_attention field is reset by then
        problems.append(f"DP attention is on (attention DP size {get_parallel().attn_dp_size}); "
                        "calibrate with --attn-dp-size 1")
    if server_args.enable_mixed_chunk:
        problems.append("mixed chunks put decode tokens into prefill batches; calibrate without --enable-mixed-chunk")
    narrow = [block.layer_id for block in blocks if block.experts.w13_weight.shape[0] < n_experts]
    if narrow:
        problems.append(f"layers {narrow} hold fewer than {n_experts} experts; calibrate the full model, not a pruned one")
    if not blocks:
        return problems
    experts, topk = blocks[0].experts, blocks[0].topk  # every MoE layer of a model is built alike
    method, config = experts.quant_method, experts.moe_runner_config
    if experts.moe_ep_size > 1:
        problems.append(f"experts are expert-parallel (EP={experts.moe_ep_size}); calibrate with --tp-size only")
    fp8 = fp8_block_size(experts)
    if fp8 is None and (not isinstance(method, UnquantizedFusedMoEMethod) or experts.w13_weight.dtype not in FLOAT_DTYPES):
        problems.append(f"experts are quantized ({type(method).__name__}, {experts.w13_weight.dtype}); "
                        "calibrate a bf16 or fp32 checkpoint, or an FP8 one with square weight blocks")
    elif fp8 and getattr(experts.w13_weight_scale_inv, "format_ue8m0", False):
        problems.append("DeepGEMM requantized the FP8 expert scales to UE8M0 and re-laid them out; "
                        "calibrate with --moe-runner-backend triton")
    elif (use_intel_amx_backend(experts) and not getattr(experts, STAND_IN_ATTR, False)
          or getattr(method, "load_up_proj_weight_first", False) or getattr(method, "w13_swiglu_interleaved", False)):
        problems.append("the MoE backend re-lays out the expert weights (AMX packing, up-first or interleaved w13); "
                        "calibrate with --moe-runner-backend triton on a GPU, or on a CPU without AMX")
    if config.activation != "silu" or config.gemm1_alpha is not None or hasattr(experts, "w13_weight_bias"):
        problems.append(f"the experts' activation ({config.activation}, clamp or bias) is not silu(W1 x) * W3 x")
    if topk.topk_config.output_format not in (None, TopKOutputFormat.STANDARD):
        problems.append("the MoE kernel routes internally; calibrate with --moe-runner-backend triton")
    return problems


def fp8_block_size(experts) -> int | None:
    """The block size of FP8 block-quantized experts as SGLang's Fp8MoEMethod holds them (w13_weight/w2_weight in
    float8, w13_weight_scale_inv/w2_weight_scale_inv [E, out/block, in/block] float32), else None."""
    from sglang.srt.layers.quantization.fp8 import Fp8MoEMethod

    method = experts.quant_method
    block = getattr(getattr(method, "quant_config", None), "weight_block_size", None)
    if not isinstance(method, Fp8MoEMethod) or not block or block[0] != block[1]:
        return None
    scale = getattr(experts, "w13_weight_scale_inv", None)
    if experts.w13_weight.dtype not in FP8_DTYPES or scale is None or scale.dtype != torch.float32:
        return None
    return int(block[0])


def _around_moe_block(forward, block, hidden_states, *args, **kwargs):
    forward_batch = args[0] if args else kwargs.get("forward_batch")
    info = getattr(block, BLOCK_ATTR, None)
    if info is None or _recorder is None or not _recorder.recording or not _is_prefill(forward_batch):
        return forward(block, hidden_states, *args, **kwargs)
    from sglang.srt.layers.layer_boundary.residual.batch import written_residual

    residual = written_residual(forward_batch)  # [T, H] h, the pre-norm residual of this sublayer
    assert residual is not None and residual.shape == hidden_states.shape, "easyep: MoE residual not found"
    setattr(block.topk, CALL_ATTR, _Call(info, block.experts, residual))
    try:
        return forward(block, hidden_states, *args, **kwargs)
    finally:
        setattr(block.topk, CALL_ATTR, None)


def _is_prefill(forward_batch) -> bool:
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return forward_batch is not None and forward_batch.forward_mode in (ForwardMode.EXTEND, ForwardMode.SPLIT_PREFILL)


def _after_topk(topk_output, topk, hidden_states, *args, **kwargs) -> None:
    # Recorded here rather than after the block: x is intact (fused experts may overwrite it in place).
    call = getattr(topk, CALL_ATTR, None)
    if call is not None and hidden_states.shape[0] > 0:
        _record(call, hidden_states, topk_output.topk_weights, topk_output.topk_ids)


@torch.no_grad()
def _record(call: _Call, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
    k = _recorder.top_k  # columns past top_k are fused shared-expert slots
    topk_ids = topk_ids[:, :k]  # [T, k]
    expert_out = _expert_outputs(call.experts, x, topk_ids, _recorder.fp8_block)  # [T, k, H] fp32, e
    if _recorder.moe_tp_size > 1:
        from sglang.srt.distributed.communication_op import moe_tensor_model_parallel_all_reduce

        expert_out = moe_tensor_model_parallel_all_reduce(expert_out)  # partial sums over I/tp -> e
    if not _recorder.accumulate:
        return
    g = topk_weights[:, :k].float() * call.block.gate_scale  # [T, k]
    r = (g.unsqueeze(-1) * expert_out).sum(dim=1).double()  # [T, H]
    h = call.residual.double()  # [T, H]
    # 1 - cos(a, b) = |a/|a| - b/|b||^2 / 2: no cancellation when cos is close to 1, and never negative.
    s = 0.5 * (F.normalize(h, dim=-1) - F.normalize(h + r, dim=-1)).square().sum(dim=-1)  # [T]
    _recorder.stats.update(call.block.row, topk_ids, g, expert_out.norm(dim=-1), s)


def _expert_outputs(experts, x: torch.Tensor, topk_ids: torch.Tensor, fp8_block: int | None) -> torch.Tensor:
    """e = W2 (silu(W1 x) * W3 x) of each (token, chosen expert), looping over the chosen experts; FP8 weights
    (fp8_block set) are dequantized one matrix at a time, and their e computed in float32 (SGLang serves FP8 with
    bf16/fp16 activations only; the kernels accumulate in float32)."""
    num_tokens, k = topk_ids.shape
    w13, w2 = experts.w13_weight, experts.w2_weight  # [E, 2I, H], [E, H, I]
    n_experts = w13.shape[0]
    ids = topk_ids.reshape(-1).long()  # [T*k]
    ids = ids.masked_fill(ids < 0, n_experts)  # padded slots sort last, into an extra bucket
    order = ids.argsort()  # [T*k], slots grouped by expert
    counts = torch.bincount(ids, minlength=n_experts + 1).tolist()  # the one host sync
    out = torch.empty(num_tokens * k, x.shape[1], dtype=torch.float32, device=x.device)  # [T*k, H]
    dtype = torch.float32 if fp8_block else x.dtype
    for expert_id, slots in enumerate(order.split(counts)):  # [n] slots of expert_id, one expert's rows at a time
        if expert_id == n_experts:
            out[slots] = 0
        elif len(slots):
            rows = x[slots // k].to(dtype)  # [n, H]
            gate, up = F.linear(rows, _weight(experts, "w13", expert_id, fp8_block, dtype)).chunk(2, dim=-1)
            out[slots] = F.linear(F.silu(gate) * up, _weight(experts, "w2", expert_id, fp8_block, dtype)).float()  # [n, H]
    return out.view(num_tokens, k, -1)


def _weight(experts, name: str, expert_id: int, fp8_block: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Expert `expert_id`'s w13 [2I, H] or w2 [H, I], real-valued."""
    weight = getattr(experts, f"{name}_weight")[expert_id]
    if fp8_block is None:
        return weight
    return fp8_blocks.dequantize(weight, getattr(experts, f"{name}_weight_scale_inv")[expert_id], dtype, fp8_block)


def _around_expert_distribution_handle(handle, scheduler, recv_req):
    if _recorder is not None:
        _recorder.control(recv_req.action.name)
    if scheduler.server_args.expert_distribution_recorder_mode is None:
        # SGLang's own recorder is the no-op one, which raises on start/stop/dump.
        from sglang.srt.managers.io_struct import ExpertDistributionReqOutput

        return ExpertDistributionReqOutput()
    return handle(scheduler, recv_req)
