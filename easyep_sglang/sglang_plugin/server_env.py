"""What a process must set before SGLang starts: the plugin's settings (settings.py) and, on a machine with no
GPU, the CPU work-arounds (stand-in kernel package, CPU flags, memory caps).

Imports nothing from SGLang, so the launcher can use it before SGLang is imported.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path

from easyep_sglang.sglang_plugin.settings import PluginSettings

PLUGIN_NAME = "easyep"  # our entry point in SGLang's sglang.srt.plugins group (pyproject.toml)
CPU_SHIM_DIR = Path(__file__).parent / "cpu_shim"

# Server arguments added on a CPU machine unless the user gave them. Keys are ServerArgs fields.
CPU_SERVER_DEFAULTS = {
    "device": "cpu",
    "attention_backend": "torch_native",
    "sampling_backend": "pytorch",
    "disable_cuda_graph": True,
    "skip_server_warmup": True,
    # An idle scheduler polls its sockets on a full core (measured: 0.96 CPU-s per second, 0.01 with this).
    "sleep_on_idle": True,
    # Without caps the scheduler reserves ~15 GB of KV cache on a CPU host.
    "max_total_tokens": 8192,
    "mem_fraction_static": 0.05,
    "chunked_prefill_size": 1024,
}


@dataclass
class ServerSetup:
    env: dict[str, str]
    defaults: dict[str, object] = field(default_factory=dict)  # ServerArgs fields to add if absent

    def cli_args(self, given: list[str]) -> list[str]:
        """Defaults rendered as launch_server flags, skipping every flag present in `given`."""
        present = {a.split("=", 1)[0] for a in given if a.startswith("--")}
        out = []
        for key, value in self.defaults.items():
            flag = "--" + key.replace("_", "-")
            if flag in present:
                continue
            out += [flag] if value is True else [flag, str(value)]
        return out


def gpu_available() -> bool:
    """Whether the CUDA driver sees a device (what torch.cuda.is_available() asks it), or a ROCm device node exists.

    Asked through the driver library rather than torch: importing torch costs the launcher seconds, and the
    server it then execs imports torch again."""
    if Path("/dev/kfd").exists():
        return True
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return libcuda.cuInit(0) == 0 and libcuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def server_setup(settings: PluginSettings, on_cpu: bool, tp_size: int = 1, base_env=None,
                 local_ranks: int = 1) -> ServerSetup:
    """local_ranks: the scheduler processes SGLang starts on this node (launch_checks.ranks_per_node); on a CPU
    each is bound to its share of the cores."""
    env = {**PluginSettings.cleared(os.environ if base_env is None else base_env), **settings.to_env()}
    recording = {}
    if settings.stats_dir:
        env.setdefault("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "0")  # /health would prefill into the statistics
        recording = {"disable_prefill_cuda_graph": True}  # hooks do not run when a captured graph replays
    if not on_cpu:
        return ServerSetup(env, recording)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env.setdefault("TORCHDYNAMO_DISABLE", "1")  # skips a ~20 s inductor compile of the grouped top-k
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CPU_SHIM_DIR), env.get("PYTHONPATH")) if p)
    if local_ranks > 1 or tp_size > 1:  # SGLang's default, a NUMA node per rank, fails with more ranks than nodes
        env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", "|".join(split_cores(local_ranks)))
    if tp_size > 1:
        # A CUDA build of torch makes pynccl look for a CUDA device; a missing library disables it.
        env.setdefault("SGLANG_NCCL_SO_PATH", str(CPU_SHIM_DIR / "no-nccl.so"))
    return ServerSetup(env, {**CPU_SERVER_DEFAULTS, **recording})


def split_cores(parts: int) -> list[str]:
    """This process's cores in `parts` equal ranges, as SGLANG_CPU_OMP_THREADS_BIND spells one ("0-3", "4")."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < parts:
        raise ValueError(f"{parts} TP ranks on this machine need at least {parts} CPU cores, it has {len(cores)}")
    size = len(cores) // parts
    chunks = [cores[i * size : (i + 1) * size] for i in range(parts)]
    return [f"{c[0]}-{c[-1]}" if len(c) > 1 else str(c[0]) for c in chunks]
