"""What a worker serves: the routing space (spec), the kept experts per layer, and where they come from.

Resolved once per process from the environment the launcher set (server_env.py) and the model path.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from easyep_sglang.mask import ExpertMask
from easyep_sglang.pruned_checkpoint import read_pruned_checkpoint
from easyep_sglang.sglang_plugin.server_env import ENV_MASK, ENV_PRUNE, ENV_PRUNED_CHECKPOINT
from easyep_sglang.spec import MoESpec, spec_from_model_path


@dataclass(frozen=True)
class ServingPlan:
    spec: MoESpec  # routing space: the source model's, also for an offline-pruned checkpoint
    keep: dict[int, tuple[int, ...]]  # restricted layers -> kept original ids, in local-id order
    prune: bool  # build only the kept experts
    pruned_on_disk: bool  # experts already renumbered and router rows sliced in the checkpoint


@functools.cache
def serving_plan(model_path: str) -> ServingPlan:
    if os.environ.get(ENV_PRUNED_CHECKPOINT) == "1":
        pruned = read_pruned_checkpoint(model_path)
        assert pruned is not None, f"{model_path} has no easyep block"
        return ServingPlan(pruned.source_spec, pruned.keep, prune=True, pruned_on_disk=True)
    spec = spec_from_model_path(model_path)
    keep = ExpertMask.load(os.environ[ENV_MASK]).resolve(spec)
    return ServingPlan(spec, keep, prune=os.environ.get(ENV_PRUNE) == "1", pruned_on_disk=False)
