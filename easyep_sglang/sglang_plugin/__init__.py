"""The only code that names SGLang internals. An SGLang upgrade touches this folder alone.

`load_plugin` is registered under SGLang's `sglang.srt.plugins` entry point, so SGLang runs it in
every process it starts (server, schedulers/TP workers, detokenizer). It only registers hooks;
what they do is configured by environment variables that the launcher sets (see server_env.py).
With none set, it registers nothing and SGLang runs unchanged.
"""

from __future__ import annotations

import os

from easyep_sglang.sglang_plugin.server_env import ENV_MASK, ENV_PRUNE, ENV_PRUNED_CHECKPOINT, ENV_RUN_DIR, ENV_STATS_DIR

TESTED_SGLANG_VERSION = "0.5.23"  # the launcher refuses another with masking flags unless --allow-untested-sglang
loaded = False  # load_plugin ran in this process


def load_plugin() -> None:
    global loaded
    loaded = True
    if os.environ.get(ENV_RUN_DIR):
        from easyep_sglang.sglang_plugin import fail_closed

        fail_closed.install()
    if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
        from easyep_sglang.sglang_plugin import cpu_compat

        cpu_compat.install()
    pruned_checkpoint = os.environ.get(ENV_PRUNED_CHECKPOINT) == "1"
    if os.environ.get(ENV_MASK) or pruned_checkpoint:
        from easyep_sglang.sglang_plugin import fail_closed, gate_mask

        gate_mask.install()
        fail_closed.install_weight_update_guard()
    if os.environ.get(ENV_MASK) and os.environ.get(ENV_PRUNE) == "1" or pruned_checkpoint:
        from easyep_sglang.sglang_plugin import expert_prune

        expert_prune.install()
    if os.environ.get(ENV_STATS_DIR):
        from easyep_sglang.sglang_plugin import stats_recorder

        stats_recorder.install()
