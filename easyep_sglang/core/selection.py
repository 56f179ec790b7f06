"""python -m easyep_sglang.select: calibration statistics -> scores -> expert mask (JSON)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from easyep_sglang import __version__
from easyep_sglang.core.datasets_io import data_digest
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.score import SCORERS, keep_for_ratio, mix_domains, score, select_budget, select_uniform
from easyep_sglang.core.spec import MoESpec, spec_from_model_path
from easyep_sglang.core.stats import ExpertStats, utc_now

TIE_WARN_SHARE = 0.25  # warn when a tie-break, not the score, chose more than this share of a layer's kept experts


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """One selection: the API of this stage; every flag of build_parser() maps onto the field of its name.
    Exactly one of keep, keep_ratio and budget sizes the mask."""
    stats: tuple[str, ...]  # one statistics file per domain
    model_path: str | Path
    out: str | Path
    domain_weights: str | None = None  # "W1,W2,...", one per stats file
    method: str = "easy_ep"
    keep: int | None = None
    keep_ratio: float | None = None
    budget: int | None = None
    multiple_of: int = 1
    seed: int = 0

    def __post_init__(self):
        if sum(size is not None for size in (self.keep, self.keep_ratio, self.budget)) != 1:
            raise ValueError("give exactly one of --keep, --keep-ratio and --budget")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m easyep_sglang.select",
        description="Choose the routed experts to keep from calibration statistics and write an expert mask.",
        epilog="example: python -m easyep_sglang.select --stats math.safetensors code.safetensors "
        "--domain-weights 2,1 --method easy_ep --keep 128 --model-path /models/DeepSeek-R1 --out mask.json\n\n"
        "Statistics with no tokens, or a MoE layer without any, are refused. A warning names the layers where "
        f"experts of equal score decided more than {TIE_WARN_SHARE:.0%} of the kept set (ties break by lower "
        "expert id): usually too few calibration tokens.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--stats", nargs="+", required=True, metavar="FILE",
        help="ExpertStats .safetensors files, one per domain; several are mixed: each layer's scores "
        "are divided by their sum, then added with --domain-weights",
    )
    parser.add_argument("--domain-weights", metavar="W1,W2,...", help="one weight per --stats file (default: equal)")
    parser.add_argument("--method", default=SelectionConfig.method, choices=list(SCORERS), help="scorer (default: %(default)s)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--keep", type=int, metavar="M", help="keep the top M experts of every MoE layer")
    size.add_argument("--keep-ratio", type=float, metavar="R", help="keep round(R * n_experts) experts of every MoE layer")
    size.add_argument(
        "--budget", type=int, metavar="B",
        help="keep B experts over all MoE layers, more where a layer's score is spread (see score.select_budget)",
    )
    parser.add_argument(
        "--multiple-of", type=int, default=SelectionConfig.multiple_of, metavar="N",
        help="keep a multiple of N experts in every layer, e.g. the expert-parallel size, which must divide "
        "each pruned layer's count (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=SelectionConfig.seed, help="seed of --method random (default: %(default)s)")
    parser.add_argument("--model-path", required=True, metavar="DIR", help="local Hugging Face model directory holding config.json")
    parser.add_argument("--out", required=True, metavar="FILE", help="mask JSON to write")
    return parser


def load_stats(path: str, spec: MoESpec, model_path: str) -> tuple[ExpertStats, dict]:
    stats, provenance = ExpertStats.load(path)
    model = provenance.get("model") or {}
    if model.get("fingerprint") != spec.fingerprint:
        raise ValueError(
            f"{path} holds statistics for another model ({model.get('architecture')}, fingerprint "
            f"{model.get('fingerprint')}) but {model_path} is {spec.architecture}, fingerprint {spec.fingerprint}; "
            f"pass the --model-path the statistics were collected on, or collect statistics for this model"
        )
    if stats.layer_ids != spec.moe_layers or stats.n_experts != spec.n_experts:
        raise ValueError(
            f"{path} covers layers {list(stats.layer_ids)} x {stats.n_experts} experts, but {spec.describe()} "
            f"has MoE layers {list(spec.moe_layers)}; collect statistics for this model"
        )
    check_tokens(path, stats, provenance)
    return stats, provenance


def check_tokens(path: str, stats: ExpertStats, provenance: dict) -> None:
    """Refuse statistics that hold no tokens, or a MoE layer that holds none: a mask is never made from nothing."""
    empty = [layer for layer, count in zip(stats.layer_ids, stats.tokens.tolist()) if count <= 0]
    if len(empty) == len(stats.layer_ids):
        raise ValueError(f"{path} holds no calibration tokens ({provenance.get('samples', 0)} samples); calibrate "
                         "on prompts that give tokens (python -m easyep_sglang.calibrate), then select from them")
    if empty:
        raise ValueError(f"{path}: MoE layers {empty} recorded no tokens while others recorded "
                         f"{int(stats.tokens.max())}; every token passes every MoE layer, so the file is damaged: "
                         "recalibrate")


def tie_decided(row: list[float], kept: list[int]) -> int:
    """How many kept experts have the score of some pruned expert: the tie-break, not the score, kept them."""
    kept_set = set(kept)
    pruned_scores = {score for expert, score in enumerate(row) if expert not in kept_set}
    return sum(row[expert] in pruned_scores for expert in kept)


def warn_ties(scores, keep: dict[int, list[int]], spec: MoESpec) -> None:
    """One line on stderr naming the layers where ties chose more than TIE_WARN_SHARE of the kept set."""
    rows = dict(zip(spec.moe_layers, scores.tolist()))  # layer -> [E]
    decided = {layer: tie_decided(rows[layer], kept) for layer, kept in keep.items()}
    tied = [layer for layer, n in decided.items() if n > TIE_WARN_SHARE * len(keep[layer])]
    if tied:
        worst = sorted(tied, key=lambda layer: -decided[layer] / len(keep[layer]))[:3]
        detail = ", ".join(f"layer {layer}: {decided[layer]} of {len(keep[layer])}" for layer in worst)
        print(f"easyep select: warning: in {len(tied)} of {len(keep)} MoE layers, experts of equal score decided more "
              f"than {TIE_WARN_SHARE:.0%} of the kept set ({detail}); calibrate on more tokens, or keep fewer experts",
              file=sys.stderr)


def parse_weights(text: str | None, n_files: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--domain-weights {text!r} must be comma-separated numbers, e.g. 1,1") from None
    if len(weights) != n_files:
        raise ValueError(f"--domain-weights has {len(weights)} weights for {n_files} --stats files; give one per file")
    return weights


def run(config: SelectionConfig) -> tuple[ExpertMask, MoESpec]:
    spec = spec_from_model_path(config.model_path)
    weights = parse_weights(config.domain_weights, len(config.stats))
    loaded = [load_stats(path, spec, config.model_path) for path in config.stats]
    domain_scores = [score(stats, config.method, config.seed) for stats, _ in loaded]  # d x [L, E]
    scores = domain_scores[0] if len(loaded) == 1 else mix_domains(domain_scores, weights)  # [L, E]
    step = config.multiple_of
    if config.budget is not None:
        selection = {"budget": config.budget}
        keep = select_budget(scores, spec, config.budget, step)
    else:
        per_layer = config.keep if config.keep is not None else keep_for_ratio(config.keep_ratio, spec, step)
        selection = {"keep": per_layer} if config.keep is not None else {"keep_ratio": config.keep_ratio, "keep": per_layer}
        keep = select_uniform(scores, spec, per_layer, step)
    if step > 1:
        selection["multiple_of"] = step
    warn_ties(scores, keep, spec)
    provenance = {
        "stats": [
            {"path": path, "sha256": data_digest(path), "provenance": prov}
            for path, (_, prov) in zip(config.stats, loaded)
        ],
        "domain_weights": weights,
        "method": config.method,
        "selection": selection,
        "seed": config.seed,
        "package_version": __version__,
        "created": utc_now(),
    }
    mask = ExpertMask.for_spec(spec, keep, config.method, provenance)
    mask.resolve(spec)  # never write a mask the server would refuse
    mask = dataclasses.replace(mask, provenance={**provenance, "mask_digest": mask.digest()})
    mask.save(config.out)
    return mask, spec


def main(argv: list[str] | None = None) -> None:
    config = SelectionConfig(**vars(build_parser().parse_args(argv)))
    try:
        mask, spec = run(config)
    except (ValueError, OSError) as err:
        sys.exit(f"easyep select: error: {err}")
    counts = [len(ids) for ids in mask.keep.values()]
    print(
        f"easyep: wrote {config.out}: {config.method} over {len(config.stats)} stats file(s), {mask.summary(spec)}, "
        f"{min(counts, default=0)}-{max(counts, default=0)} per layer, {mask.provenance['mask_digest']}"
    )
