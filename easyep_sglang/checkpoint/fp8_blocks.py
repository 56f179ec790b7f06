"""FP8 block quantization as DeepSeek-V3/R1 release it: float8_e4m3fn weights, and for each block of
BLOCK x BLOCK weights one float32 `weight_scale_inv` (the factor back to real values), blocks at the edges
partial. quantization_config: {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]}.
"""

from __future__ import annotations

import math

import torch

BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [BLOCK, BLOCK]}


def quantize(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight [N, K], weight_scale_inv [ceil(N/block), ceil(K/block)] float32) of a 2-D weight."""
    n, k = weight.shape
    rows, cols = math.ceil(n / block), math.ceil(k / block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32)
    padded[:n, :k] = weight.float()
    blocks = padded.view(rows, block, cols, block)  # [rows, block, cols, block]
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [rows, cols]
    quantized = (blocks / scale_inv[:, None, :, None]).view(rows * block, cols * block)[:n, :k]
    return quantized.to(torch.float8_e4m3fn), scale_inv


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, block: int = BLOCK) -> torch.Tensor:
    """The real-valued [N, K] weight in `dtype`: each fp8 value times its block's scale, computed in float32.
    Takes one matrix, so a caller dequantizing one expert at a time holds one expert's matrix at a time."""
    n, k = weight.shape
    real = weight.float()  # [N, K]
    if n % block == 0 and k % block == 0:  # whole blocks (expert weights): scaled in place, one fp32 copy
        real.view(n // block, block, k // block, block).mul_(scale_inv.float()[:, None, :, None])
        return real.to(dtype)
    scale = scale_inv.float().repeat_interleave(block, dim=0)[:n].repeat_interleave(block, dim=1)[:, :k]  # [N, K]
    return (real * scale).to(dtype)
