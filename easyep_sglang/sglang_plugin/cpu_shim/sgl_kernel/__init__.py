"""Pure-PyTorch stand-in for SGLang's CUDA-only kernel package, for CPU machines without AMX.

SGLang's CPU mode imports a few `*_cpu` helpers from `sgl_kernel` at module load; the CUDA wheel
cannot be imported without libcuda. The launcher puts this folder first on PYTHONPATH only when
it serves on a CPU. Only the helper the plain CPU path calls is implemented; any other name
resolves to a function that raises, so a path that needs a real kernel fails loudly.
"""

def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, _pool_len):
    offset = 0
    for pool_idx, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        n = end - start
        req_to_token[pool_idx, start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} has no CPU stand-in (easyep_sglang cpu_shim)")

    unavailable.__name__ = name
    return unavailable


__version__ = "0.0.0+easyep.cpu"
