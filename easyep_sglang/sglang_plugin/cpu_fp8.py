"""FP8 block-quantized checkpoints (DeepSeek-V3/R1 as released) on a CPU without AMX, through SGLang's own FP8 code.

SGLang 0.5.23 serves FP8 on a CPU only with AMX: Fp8LinearMethod and Fp8MoEMethod assert `cpu_has_amx_support()`
after loading (layers/quantization/fp8.py:826, :1290, :2185), pack the weights for AMX
(`_amx_process_weight_after_loading`), and then call three sgl_kernel CPU kernels: `fp8_scaled_mm_cpu` for linear
layers (fp8.py:1402), `fused_experts_cpu` with FP8_W8A16 for the routed experts (fp8.py:3117) and, in DeepSeek's
MoE block, `shared_expert_cpu` for the shared expert plus the scaled routed output (models/deepseek_v2.py:1486).
Everything else (the config, creating the FP8 parameters, SGLang's FP8 weight loaders, MLA's FP8 kv_b_proj
handling, routing) is SGLang's own and runs unchanged. This module stands in for the AMX part alone:
- the AMX check passes, and "packing" keeps each weight in the checkpoint's [out, in] layout (marked STAND_IN_ATTR,
  so the calibration recorder knows the layout is the checkpoint's);
- the kernels are registered under torch.ops.sgl_kernel, computed in plain PyTorch: each weight block times its
  scale (fp8_blocks.dequantize), then the matmul in the activations' dtype, expert outputs summed in float32.
  W8A16 means exactly that: FP8 weights, 16-bit activations, no activation quantization. They return their result
  and write nothing in place (their callers in SGLang use the returned tensor).
Not stood in: anything that reads AMX-packed weights, other CPU quant methods (int8, int4, MXFP4), which still fail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from easyep_sglang.checkpoint import fp8_blocks

FP8_MODULE = "sglang.srt.layers.quantization.fp8"
STAND_IN_ATTR = "easyep_fp8_checkpoint_layout"  # on a layer whose FP8 weights keep the checkpoint's layout
FP8_W8A16 = 2  # sglang.srt.layers.amx_utils.CPUQuantMethod.FP8_W8A16
_library: torch.library.Library | None = None


def install() -> None:
    import importlib

    fp8 = importlib.import_module(FP8_MODULE)
    fp8._is_cpu_amx_available = True  # the asserts at fp8.py:826, :1290, :2185
    fp8._amx_process_weight_after_loading = _keep_checkpoint_layout
    _register_kernels()


def _keep_checkpoint_layout(module: torch.nn.Module, weight_names, transpose_dims=None, qweight_packed_method=None):
    """Where SGLang would pack for AMX: keep the weights as loaded, and route the forward to the stand-in kernels."""
    assert not transpose_dims and qweight_packed_method is None, "only block-quantized FP8 is stood in"
    module.use_intel_amx_backend = True
    setattr(module, STAND_IN_ATTR, True)


def _register_kernels() -> None:
    global _library
    if _library is not None:
        return
    _library = torch.library.Library("sgl_kernel", "FRAGMENT")
    _library.define("fp8_scaled_mm_cpu(Tensor mat1, Tensor mat2, Tensor scales2, int[] block_size, Tensor? bias, "
                    "ScalarType out_dtype, bool is_vnni) -> Tensor")
    _library.define("fused_experts_cpu(Tensor hidden_states, Tensor w1, Tensor w2, Tensor topk_weights, "
                    "Tensor topk_ids, bool inplace, int moe_comp_method, Tensor? w1_scale, Tensor? w2_scale, "
                    "Tensor? w1_zp, Tensor? w2_zp, int[]? block_size, Tensor? w1_bias, Tensor? w2_bias, "
                    "Tensor? alpha, Tensor? limit, bool is_vnni, str activation) -> Tensor")
    _library.define("shared_expert_cpu(Tensor hidden_states, Tensor w1, Tensor w2, Tensor fused_experts_out, "
                    "float routed_scaling_factor, bool inplace, bool use_int8_w8a8, bool use_fp8_w8a16, "
                    "Tensor? w1_scale, Tensor? w2_scale, int[]? block_size, bool is_vnni) -> Tensor")
    _library.impl("fp8_scaled_mm_cpu", fp8_scaled_mm, "CPU")
    _library.impl("fused_experts_cpu", fused_experts, "CPU")
    _library.impl("shared_expert_cpu", shared_expert, "CPU")


def _square_block(block_size) -> int:
    assert block_size is not None and block_size[0] == block_size[1], f"square weight blocks only, got {block_size}"
    return int(block_size[0])


def fp8_scaled_mm(x, weight, scale_inv, block_size, bias, out_dtype, is_vnni):
    """x [T, K] @ W.T, W [N, K] block-quantized: the output [T, N] in out_dtype."""
    out = F.linear(x, fp8_blocks.dequantize(weight, scale_inv, x.dtype, _square_block(block_size)), bias)
    return out.to(out_dtype)


def fused_experts(x, w13, w2, topk_weights, topk_ids, inplace, method, w13_scale, w2_scale, w1_zp, w2_zp,
                  block_size, w1_bias, w2_bias, alpha, limit, is_vnni, activation):
    """sum_k topk_weights[t, k] * W2_e (silu(W1_e x_t) * W3_e x_t), e = topk_ids[t, k]; w13 [E, 2I, H] (gate rows,
    then up), w2 [E, H, I]. Experts are dequantized one at a time, only those chosen."""
    assert method == FP8_W8A16 and activation == "silu", f"stand-in covers FP8_W8A16 silu only, got {method}, {activation}"
    assert all(t is None for t in (w1_zp, w2_zp, w1_bias, w2_bias, alpha, limit)), "no zero points, biases or clamps"
    block = _square_block(block_size)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    for expert in topk_ids.unique().tolist():
        if expert < 0:
            continue
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)  # [n] each
        y = _expert_mlp(x[tokens], w13[expert], w13_scale[expert], w2[expert], w2_scale[expert], block)  # [n, H]
        out.index_add_(0, tokens, y.float() * topk_weights[tokens, slots, None].float())
    return out.to(x.dtype)


def shared_expert(x, w13, w2, routed_out, routed_scaling_factor, inplace, use_int8, use_fp8, w13_scale, w2_scale,
                  block_size, is_vnni):
    """W2 (silu(W1 x) * W3 x) of the FP8 shared expert (w13 [2I, H], w2 [H, I]) + routed_scaling_factor x routed_out."""
    assert use_fp8 and not use_int8, "stand-in covers FP8_W8A16 shared experts only"
    shared = _expert_mlp(x, w13, w13_scale, w2, w2_scale, _square_block(block_size))  # [T, H]
    return (shared.float() + routed_out.float() * routed_scaling_factor).to(x.dtype)


def _expert_mlp(x, w13, w13_scale, w2, w2_scale, block: int) -> torch.Tensor:
    """W2 (silu(W1 x) * W3 x) of one FP8 expert (w13 [2I, H], gate rows first; w2 [H, I]), in x's dtype."""
    gate, up = F.linear(x, fp8_blocks.dequantize(w13, w13_scale, x.dtype, block)).chunk(2, -1)
    return F.linear(F.silu(gate) * up, fp8_blocks.dequantize(w2, w2_scale, x.dtype, block))
