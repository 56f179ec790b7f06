"""Deployment shapes for `bench.sweep --same-hardware`: every configuration on the full model's devices.

A configuration runs in the smallest shape that holds its weights plus a KV reserve: TP over the fewest
devices that fit (easyep_sglang.checkpoint.capacity's memory model), and the rest of the devices as data-parallel replicas:
one server per replica, dealt the requests in turn (as launch/deepseek_r1_same_hardware.sh serves one per
node), or one server with SGLang's --dp-size. On a CPU a "device" is one core, bound through
SGLANG_CPU_OMP_THREADS_BIND, and its memory is a budget the plan divides: the KV tokens left are passed as
--max-total-tokens, so each shape holds the KV cache its devices would. On a GPU the device memory is real and
SGLang sizes the KV cache itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from easyep_sglang.checkpoint.capacity import Footprint, capacity, human
from easyep_sglang.core.spec import MoESpec

SAME_HARDWARE, ALONE = "same-hardware", "one-replica-alone"  # a row's layout: the shape, or one replica of it


@dataclass(frozen=True)
class Hardware:
    devices: int
    device_memory: int  # bytes per device for weights and KV cache
    kv_reserve_tokens: int  # a shape fits only if each replica holds at least this many KV tokens
    kv_dtype_bytes: int = 2


@dataclass(frozen=True)
class Shape:
    tp: int
    replicas: int
    weights_per_device: int
    kv_tokens: int  # per replica; MLA keeps one latent per token on every TP rank

    @property
    def devices(self) -> int:
        return self.tp * self.replicas

    def alone(self) -> Shape:
        """One of this shape's replicas on its own devices, the others idle."""
        return Shape(self.tp, 1, self.weights_per_device, self.kv_tokens)

    def describe(self) -> str:
        return f"TP={self.tp} x {self.replicas} replica{'s' if self.replicas > 1 else ''}"


@dataclass(frozen=True)
class Deployment:
    """One server of a shape: its launcher flags and the environment that binds its ranks on a CPU."""
    flags: list[str]
    env: dict[str, str]


def deployments(shape: Shape, on_cpu: bool, as_servers: bool) -> list[Deployment]:
    """The servers that serve a shape: one per replica (as_servers, dealt requests by bench.common.serving.bench_replicas),
    or one with SGLang's --dp-size. On a CPU each rank is bound to one core of this process's, in order, and the KV
    tokens the shape's devices leave are passed as --max-total-tokens; a GPU sizes its own KV cache."""
    servers, dp_size = (shape.replicas, 1) if as_servers else (1, shape.replicas)
    cores = sorted(os.sched_getaffinity(0))
    if on_cpu and len(cores) < shape.devices:
        raise ValueError(f"{shape.describe()} needs {shape.devices} CPU cores (one per device), this process has "
                         f"{len(cores)}; lower --same-hardware")
    flags = ["--tp-size", str(shape.tp), "--dp-size", str(dp_size)]
    if not on_cpu:
        return [Deployment(flags, {})] * servers
    per_server = shape.tp * dp_size
    return [Deployment(flags + ["--max-total-tokens", str(shape.kv_tokens)],
                       {"SGLANG_CPU_OMP_THREADS_BIND": "|".join(map(str, cores[i * per_server:(i + 1) * per_server]))})
            for i in range(servers)]


def smallest_shape(fp: Footprint, config: dict, spec: MoESpec, hardware: Hardware) -> Shape:
    """The fewest devices (a power of two dividing hardware.devices) whose memory holds `fp` and the KV reserve,
    replicated over the rest. Raises ValueError, naming the fix, when all the devices do not hold it."""
    tp = 1
    while tp <= hardware.devices:
        if hardware.devices % tp == 0:
            cap = capacity(fp, config, spec, tp, hardware.device_memory, 1.0, hardware.kv_dtype_bytes,
                           hardware.kv_reserve_tokens)
            if cap.fits:
                return Shape(tp, hardware.devices // tp, cap.weights_per_gpu, cap.kv_tokens)
        tp *= 2
    raise ValueError(f"{human(fp.served_bytes)} of weights plus {hardware.kv_reserve_tokens:,} KV tokens do not fit "
                     f"{hardware.devices} devices of {human(hardware.device_memory)}; raise --device-memory or "
                     "--same-hardware")
