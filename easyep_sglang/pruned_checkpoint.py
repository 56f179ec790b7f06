"""Serving an offline-pruned checkpoint exactly: what its config.json `easyep` block says about its source.

A stock engine routes a pruned checkpoint over the kept experts with the config's own group
settings; that is exact only when the pruner says `stock_engine: exact`. Otherwise our plugin serves
it in the source model's routing space: the config's expert count and groups are set back to the
source's (SGLang's --json-model-override-args), the sliced router rows are scattered back to their
original ids, the pruned ones are masked, and the kept experts load from the checkpoint as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from easyep_sglang.spec import MoESpec, load_config, spec_from_config

BLOCK = "easyep"


@dataclass(frozen=True)
class PrunedCheckpoint:
    stock_engine: str  # "exact" | "approximate" | "plugin-only"
    source_spec: MoESpec
    keep: dict[int, tuple[int, ...]]  # layer -> original id of each new expert, in new-id order
    source_overrides: dict  # config keys that restore the source's routing space

    @property
    def needs_plugin(self) -> bool:
        return self.stock_engine != "exact"


def read_pruned_checkpoint(model_path) -> PrunedCheckpoint | None:
    config = load_config(model_path)
    block = config.get(BLOCK)
    if block is None:
        return None
    if block.get("format") != "easyep-pruned" or block.get("version") != 1:
        raise ValueError(f"{model_path}: unknown '{BLOCK}' block in config.json; re-run python -m easyep_sglang.prune")
    pruned_spec = spec_from_config(config)
    overrides = {pruned_spec.experts_config_key: block["source_n_experts"]}
    if block["source_n_group"] > 1:
        overrides.update(n_group=block["source_n_group"], topk_group=block["source_topk_group"])
    source_spec = spec_from_config({**config, **overrides})
    if source_spec.fingerprint != block["source_fingerprint"]:
        raise ValueError(f"{model_path}: config.json no longer matches the checkpoint it was pruned from; re-run the pruner")
    keep = {int(l): tuple(ids) for l, ids in block["kept"].items()}
    return PrunedCheckpoint(block["stock_engine"], source_spec, keep, overrides)
