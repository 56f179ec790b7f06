"""In-process work-arounds that let SGLang 0.5.23 serve DeepSeek/Qwen MoE models on a CPU without AMX.

Active only when SGLANG_USE_CPU_ENGINE=1 (set by the launcher on a machine with no GPU).
"""

from __future__ import annotations

import functools

import torch


@functools.cache  # once per process, however often the plugin is loaded
def install() -> None:
    _register_mla_dispatch_for_torch_native()
    _disable_stream_capture_probe_without_cuda()
    from easyep_sglang.sglang_plugin import cpu_fp8

    cpu_fp8.install()  # FP8 block-quantized checkpoints without AMX


def _register_mla_dispatch_for_torch_native() -> None:
    # The DeepSeek attention dispatcher has no torch_native entry and falls back to the triton one,
    # which picks the MHA prefill path and breaks MLA's latent KV cache on CPU.
    from sglang.srt.models.deepseek_common.attention_backend_handler import (
        AttentionBackendRegistry,
        _dispatch_mla_subtype,
    )

    AttentionBackendRegistry.register("torch_native", _dispatch_mla_subtype)


def _disable_stream_capture_probe_without_cuda() -> None:
    # The expert-distribution recorder asks the device module whether a CUDA graph is being
    # captured; on a CUDA build of torch with no GPU that query raises a driver error.
    if not torch.cuda.is_available():
        torch.cuda.is_current_stream_capturing = lambda: False
