"""The served mask, shown in SGLang's own `GET /server_info`: what the server routes to, and what each worker applied.

    curl -s http://127.0.0.1:30000/server_info | jq .easyep
    {"mode": "prune", "mask_digest": "sha256:…", "layers": [1, 2], "kept": 18, "n_experts": 16,
     "workers": [{"worker": "sglang::scheduler_TP0", "pid": 4242, "mask_digest": "sha256:…", "mask_layers": [1, 2],
                  "kept": 18, "pruned_layers": [1, 2], "recorder": false, "unresolved": []}, …]}

`mask_digest` is `ExpertMask.digest()` of the mask as resolved against the model (restricted layers only, ids
sorted), null when no mask was asked for; a mask as `python -m easyep_sglang.select` writes it has this digest
itself. `mode` is one of SERVING_MODES; `workers` holds one report per scheduler (every TP rank), each checked
against the request before the HTTP server started (fail_closed.py).

The server process holds those reports, so it adds them to the first scheduler's init info, which SGLang merges
into /server_info. `internal_states` would not do: each DP group's first TP rank alone answers it, so the other
ranks' reports would need a collective among the workers at request time.
Imports nothing from SGLang (the clients in eval/provenance.py read REPORT_KEY).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from easyep_sglang.checkpoint.pruned_checkpoint import read_pruned_checkpoint
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.spec import MoESpec
from easyep_sglang.sglang_plugin.settings import PluginSettings

REPORT_KEY = "easyep"  # in GET /server_info
# full: every expert; mask: --mask; prune: --mask --prune; pruned-checkpoint: an offline-pruned checkpoint served
# through the plugin; stock-pruned-checkpoint: one a stock engine serves exactly (the plugin applies nothing).
SERVING_MODES = ("full", "mask", "prune", "pruned-checkpoint", "stock-pruned-checkpoint")


@dataclass(frozen=True)
class ServedMask:
    mode: str  # one of SERVING_MODES
    keep: dict[int, tuple[int, ...]]  # restricted layers -> kept original ids, MTP layers included
    spec: MoESpec | None  # the routing space (the source model's for a pruned checkpoint); None when full

    @property
    def applied_by_workers(self) -> bool:
        """The workers apply it (gate mask, and pruning); a stock-pruned checkpoint is pruned on disk alone."""
        return self.mode in ("mask", "prune", "pruned-checkpoint")

    @property
    def mask_digest(self) -> str | None:
        return None if self.mode == "full" else ExpertMask(self.keep).digest()

    @property
    def target_layers(self) -> list[int]:
        """Restricted layers of the target model; an MTP draft model's are applied by its own worker."""
        return sorted(set(self.keep) - set(self.spec.mtp_layers)) if self.keep else []

    def summary(self, reports: list) -> dict:
        return {
            "mode": self.mode,
            "mask_digest": self.mask_digest,
            "layers": sorted(self.keep),
            "kept": sum(len(ids) for ids in self.keep.values()),  # over `layers`, of len(layers) * n_experts
            "n_experts": self.spec.n_experts if self.spec else None,
            "workers": [dataclasses.asdict(report) for report in reports],
        }


def requested(model_path: str) -> ServedMask:
    """What the launcher asked this server to serve (its environment and the model directory)."""
    settings = PluginSettings.from_env()
    if settings.routes_around_experts:
        from easyep_sglang.sglang_plugin.serving_plan import serving_plan

        plan = serving_plan(model_path)
        mode = "pruned-checkpoint" if plan.pruned_on_disk else "prune" if settings.prune else "mask"
        return ServedMask(mode, plan.keep, plan.spec)
    pruned = read_pruned_checkpoint(model_path) if (Path(model_path) / "config.json").is_file() else None
    if pruned:
        return ServedMask("stock-pruned-checkpoint", pruned.keep, pruned.source_spec)
    return ServedMask("full", {}, None)


def publish(infos: list[dict], reports: list, served: ServedMask) -> list[dict]:
    """The schedulers' init infos with the served mask and every worker's report in the first one."""
    return [{**infos[0], REPORT_KEY: served.summary(reports)}, *infos[1:]]
