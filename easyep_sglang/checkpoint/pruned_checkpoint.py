"""The `easyep` block of an offline-pruned checkpoint's config.json: written by the pruner, read by the launcher.

The routed-expert count keys (`n_routed_experts`, `num_experts`, `num_local_experts`, those
present) get the largest count over the MoE and MTP layers, and the `easyep` block records what the
plugin needs:
    {"format": "easyep-pruned", "version": 1, "stock_engine": "exact" | "approximate" | "plugin-only",
     "source_n_experts", "source_n_group", "source_topk_group", "source_fingerprint", "mask_digest",
     "per_layer_experts": {"<layer>": count, ...},           # every MoE and MTP layer
     "kept": {"<layer>": [orig id of new expert 0, ...]}}    # pruned layers; orig group = orig id // group size
`stock_engine` says how a stock engine (one expert count, one group setting, read by the main model and by
SGLang's NextN draft of the MTP layer alike) serves the result:
- exact: every MoE and MTP layer keeps the same count, and either routing has no groups (softmax over kept logits
  equals the masked softmax; top-k over kept sigmoid scores equals the -1e4-bias mask), or every layer keeps
  m experts in each of g groups, with m = group size or m >= the group score width (top-2 for sigmoid, max
  for softmax). Group scores then equal the masked model's, empty groups never win, so `n_group = g`,
  `topk_group = min(topk_group, g)` routes exactly as the masked full model.
- approximate: same count everywhere but groups split unevenly; the stock fallback is `n_group = 1,
  topk_group = 1` (plain top-k over kept experts), which can differ from the masked model. Exact routing needs
  the easyep plugin, which routes in the source expert space using `kept`.
- plugin-only: counts differ per layer; only the easyep plugin loads it (it reads `per_layer_experts`).
  The largest count goes into config.json, so a stock engine refuses the smaller layers (a size mismatch at
  load) instead of routing them wrongly.
An MTP layer the mask does not name keeps all its experts, so beside pruned MoE layers it makes the checkpoint
plugin-only: our launcher restores the source expert count for the main model and the NextN draft alike. A
pruned MTP layer must keep the checkpoint `exact` (`check_pruned_mtp`): the plugin builds SGLang's draft
model in full and does not renumber its experts, so only stock routing serves a pruned MTP layer.

A stock engine routes a pruned checkpoint over the kept experts with the config's own group
settings; that is exact only when the pruner says `stock_engine: exact`. Otherwise our plugin serves
it in the source model's routing space: the config's expert count and groups are set back to the
source's (SGLang's --json-model-override-args), the sliced router rows are scattered back to their
original ids, the pruned ones are masked, and the kept experts load from the checkpoint as they are.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from easyep_sglang.core.routing import group_score_width
from easyep_sglang.core.spec import MoESpec, load_config, spec_from_config

BLOCK = "easyep"
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")
STOCK_NOTES = {
    "exact": "",
    "approximate": "; groups are split unevenly, so a stock engine routes by plain top-k over the kept experts, "
                   "which can differ from the masked model: serve it with the easyep plugin for exact routing",
    "plugin-only": "; expert counts differ per layer, so only the easyep plugin can load it",
}


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
    stock = stock_routing(source_spec, keep)[3]
    if stock != block["stock_engine"]:  # an earlier pruner judged the MoE layers alone, MTP layers aside
        raise ValueError(f"{model_path}: config.json says stock_engine '{block['stock_engine']}', but its layers' "
                         f"kept experts make it '{stock}'; re-run python -m easyep_sglang.prune")
    check_pruned_mtp(source_spec, keep)
    return PrunedCheckpoint(stock, source_spec, keep, overrides)


def _group_shape(spec: MoESpec, ids) -> tuple[int, int] | None:
    """(groups holding kept experts, kept per such group) when all such groups keep the same number."""
    per_group = Counter(spec.group_of(e) for e in ids)
    sizes = set(per_group.values())
    return (len(per_group), sizes.pop()) if len(sizes) == 1 else None


def stock_routing(spec: MoESpec, kept: dict[int, tuple[int, ...]]) -> tuple[int, int, int, str]:
    """(expert count, n_group, topk_group, stock_engine) for the pruned config, over every MoE and MTP layer;
    see the module docstring."""
    return _stock_routing(spec, _layer_ids(spec, kept, spec.prunable_layers))


def _layer_ids(spec: MoESpec, kept: dict[int, tuple[int, ...]], layers: tuple[int, ...]) -> dict:
    return {l: kept.get(l, range(spec.n_experts)) for l in layers}


def _stock_routing(spec: MoESpec, layer_ids: dict) -> tuple[int, int, int, str]:
    counts = {len(ids) for ids in layer_ids.values()}
    n = max(counts)
    if len(counts) > 1:
        return n, 1, 1, "plugin-only"
    if spec.n_group <= 1:
        return n, spec.n_group, spec.topk_group, "exact"
    width = group_score_width(spec)
    shapes = {_group_shape(spec, ids) for ids in layer_ids.values()}
    if len(shapes) == 1 and (shape := shapes.pop()) and (shape[1] >= width or shape[1] == spec.group_size):
        return n, shape[0], min(spec.topk_group, shape[0]), "exact"
    return n, 1, 1, "approximate"


def check_pruned_mtp(spec: MoESpec, kept: dict[int, tuple[int, ...]]) -> None:
    """Refuse a pruned MTP layer in a checkpoint that is not `exact` (see the module docstring)."""
    pruned_mtp = sorted(set(kept) & set(spec.mtp_layers))
    if not pruned_mtp or stock_routing(spec, kept)[3] == "exact":
        return
    n, _, _, main_stock = _stock_routing(spec, _layer_ids(spec, kept, spec.moe_layers))
    if main_stock != "exact":
        fix = f"remove layer(s) {pruned_mtp} from the mask: the MoE layers alone are {main_stock} in stock engines"
    elif spec.n_group > 1 and (shape := _group_shape(spec, kept.get(spec.moe_layers[0], range(spec.n_experts)))):
        fix = f"keep {n} experts in layer(s) {pruned_mtp} as the MoE layers do, {shape[1]} in each of {shape[0]} groups"
    else:
        fix = f"keep {n} experts in layer(s) {pruned_mtp}, as every MoE layer does"
    raise ValueError(f"MTP layer(s) {pruned_mtp} are pruned, but SGLang's NextN draft serves a pruned MTP layer only "
                     f"from a stock-exact checkpoint (the easyep plugin builds the draft in full); {fix}, or leave "
                     f"them out of the mask (the easyep launcher then serves them unpruned)")


def check_load_time_prune(spec: MoESpec, kept: dict[int, tuple[int, ...]]) -> None:
    """Refuse pruning an MTP layer at load time: the plugin builds SGLang's NextN draft in full and does not
    renumber its experts; only an offline-pruned, stock-exact checkpoint serves a pruned MTP layer."""
    if pruned_mtp := sorted(set(kept) & set(spec.mtp_layers)):
        raise ValueError(f"MTP layers cannot be pruned at load time; use python -m easyep_sglang.prune "
                         f"(the mask names MTP layer(s) {pruned_mtp})")


def mtp_note(spec: MoESpec, kept: dict[int, tuple[int, ...]]) -> str:
    """Why a checkpoint whose MoE layers alone would be exact is not: its MTP layers keep other counts."""
    main = _stock_routing(spec, _layer_ids(spec, kept, spec.moe_layers))
    if not spec.mtp_layers or main[3] != "exact" or stock_routing(spec, kept)[3] == "exact":
        return ""
    counts = sorted({len(ids) for ids in _layer_ids(spec, kept, spec.mtp_layers).values()})
    return (f"; the MoE layers alone keep {main[0]} experts each and would be exact, but MTP layer(s) "
            f"{list(spec.mtp_layers)} keep {'/'.join(map(str, counts))}: name them in the mask with the MoE layers' "
            f"count and groups for a checkpoint that stock SGLang serves with NEXTN speculative decoding")


def pruned_config(config: dict, spec: MoESpec, kept: dict[int, tuple[int, ...]], mask_digest: str) -> dict:
    check_pruned_mtp(spec, kept)
    n, n_group, topk_group, stock = stock_routing(spec, kept)
    new = dict(config)
    for key in EXPERT_COUNT_KEYS:
        if key in new:
            new[key] = n
    if spec.n_group > 1:
        new["n_group"], new["topk_group"] = n_group, topk_group
    block = {
        "format": "easyep-pruned", "version": 1, "stock_engine": stock,
        "source_n_experts": spec.n_experts, "source_n_group": spec.n_group, "source_topk_group": spec.topk_group,
        "source_fingerprint": spec.fingerprint, "mask_digest": mask_digest,
        "per_layer_experts": {str(l): len(kept.get(l, range(spec.n_experts))) for l in spec.prunable_layers},
        # original id of each new expert; its routing group is original id // (source experts / source groups)
        "kept": {str(l): list(ids) for l, ids in sorted(kept.items())},
    }
    new["easyep"] = block
    return new
