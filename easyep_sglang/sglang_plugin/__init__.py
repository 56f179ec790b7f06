"""The only code that names SGLang internals. An SGLang upgrade touches this folder alone.

`load_plugin` is registered under SGLang's `sglang.srt.plugins` entry point, so SGLang runs it in
every process it starts (server, schedulers/TP workers, detokenizer). It only registers hooks;
what they do is set by the launcher through the environment (settings.py).
With none set, it registers nothing and SGLang runs unchanged.
"""

from __future__ import annotations

import os

from easyep_sglang.sglang_plugin.settings import PluginSettings

TESTED_SGLANG_VERSION = "0.5.23"  # the launcher refuses another with masking flags unless --allow-untested-sglang
loaded = False  # load_plugin ran in this process


def load_plugin() -> None:
    global loaded
    loaded = True
    settings = PluginSettings.from_env()
    if settings.run_dir:
        from easyep_sglang.sglang_plugin import fail_closed

        fail_closed.install()
    if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
        from easyep_sglang.sglang_plugin import cpu_compat

        cpu_compat.install()
    if settings.routes_around_experts:
        from easyep_sglang.sglang_plugin import fail_closed, gate_mask

        gate_mask.install()
        fail_closed.install_weight_update_guard()
    if settings.builds_kept_experts_only:
        from easyep_sglang.sglang_plugin import expert_prune

        expert_prune.install()
    if settings.stats_dir:
        from easyep_sglang.sglang_plugin import stats_recorder

        stats_recorder.install()
