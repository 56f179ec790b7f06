"""What a worker serves: the routing space (spec), the kept experts per layer, and where they come from.

Resolved once per process from the plugin's settings (settings.py) and the model path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from easyep_sglang.checkpoint.pruned_checkpoint import check_load_time_prune, read_pruned_checkpoint
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.spec import MoESpec, spec_from_model_path
from easyep_sglang.sglang_plugin.settings import PluginSettings


@dataclass(frozen=True)
class ServingPlan:
    spec: MoESpec  # routing space: the source model's, also for an offline-pruned checkpoint
    keep: dict[int, tuple[int, ...]]  # restricted layers -> kept original ids, in local-id order
    pruned_on_disk: bool  # experts already renumbered and router rows sliced in the checkpoint


@functools.cache
def serving_plan(model_path: str) -> ServingPlan:
    settings = PluginSettings.from_env()
    if settings.pruned_checkpoint:
        pruned = read_pruned_checkpoint(model_path)
        assert pruned is not None, f"{model_path} has no easyep block"
        return ServingPlan(pruned.source_spec, pruned.keep, pruned_on_disk=True)
    spec = spec_from_model_path(model_path)
    keep = ExpertMask.load(settings.mask).resolve(spec)
    if settings.prune:
        check_load_time_prune(spec, keep)
    return ServingPlan(spec, keep, pruned_on_disk=False)
