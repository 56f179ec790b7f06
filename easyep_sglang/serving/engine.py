"""`sglang.Engine` with our plugin configured and, on a machine with no GPU, the CPU work-arounds.

    if __name__ == "__main__":  # the Engine spawns its workers
        engine = create_engine("/models/M", record_stats_dir="stats/", tp_size=1)
        stats, provenance = calibrate.collect(EngineClient(engine), "stats/", samples)
        engine.shutdown()

The plugin reads its settings (PluginSettings) from the environment, which the Engine's worker processes inherit,
so create_engine sets them in this process (os.environ) before the Engine starts. Call it before
anything imports SGLang's model code: SGLang decides CPU mode (SGLANG_USE_CPU_ENGINE) at import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.serving.launch_checks import check_settings, ranks_per_node
from easyep_sglang.sglang_plugin.server_env import CPU_SHIM_DIR, gpu_available, server_setup
from easyep_sglang.sglang_plugin.settings import PluginSettings


def create_engine(model_path: str | Path, mask: str | Path | None = None, record_stats_dir: str | Path | None = None,
                  **sglang_kwargs):
    """An `sglang.Engine` (ServerArgs fields as keyword arguments) that applies `mask` at gating time and, with
    `record_stats_dir`, records calibration statistics there (see sglang_plugin/stats_recorder.py)."""
    if mask:
        ExpertMask.load(mask).summary(spec_from_model_path(model_path))  # validates before SGLang starts
    check_settings(sglang_kwargs, tp_size=sglang_kwargs.get("tp_size", 1), masked=bool(mask),
                   record_stats=bool(record_stats_dir), model_path=model_path)
    device = sglang_kwargs.get("device")
    on_cpu = device == "cpu" or (device is None and not gpu_available())
    tp_size = sglang_kwargs.get("tp_size", 1)
    settings = PluginSettings(mask=Path(mask).resolve() if mask else None,
                              stats_dir=Path(record_stats_dir).resolve() if record_stats_dir else None)
    setup = server_setup(settings, on_cpu=on_cpu, tp_size=tp_size, local_ranks=ranks_per_node(sglang_kwargs, tp_size))
    for key in set(os.environ) - set(setup.env):  # e.g. a mask left over from an earlier create_engine
        del os.environ[key]
    os.environ.update(setup.env)
    if on_cpu and str(CPU_SHIM_DIR) not in sys.path:
        sys.path.insert(0, str(CPU_SHIM_DIR))  # the stand-in sgl_kernel, for this process; workers get PYTHONPATH
    import sglang

    return sglang.Engine(model_path=str(model_path), **{**setup.defaults, **sglang_kwargs})


class EngineClient:
    """An Engine seen through the calls calibrate.collect makes (calibrate.ServerClient: the same over HTTP)."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, input_ids: list[list[int]], sampling_params: list[dict]) -> list[dict]:
        return self.engine.generate(input_ids=input_ids, sampling_params=sampling_params)

    def flush_cache(self) -> bool:
        return self.engine.flush_cache().success

    def expert_record(self, action: str) -> None:
        getattr(self.engine, f"{action}_expert_distribution_record")()
