"""Scores from ExpertStats (SCORERS), mixed-domain scores, and the choice of experts to keep.

Every selection ranks a layer's experts by score descending, then expert id ascending, so ties
never depend on torch.topk. A set that the group-limited router could starve is repaired
(`repair_groups`) before it is returned.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from easyep_sglang.core.mask import MaskError
from easyep_sglang.core.routing import top_k_always_reachable
from easyep_sglang.core.spec import MoESpec
from easyep_sglang.core.stats import ExpertStats


def _easy_ep(stats: ExpertStats, seed: int) -> torch.Tensor:
    """I[l, i] = sum_t g[i,t] * ||e[i,t]|| * s[t]"""
    return stats.easy_ep


def _easy_ep_no_token(stats: ExpertStats, seed: int) -> torch.Tensor:
    """I[l, i] = sum_t g[i,t] * ||e[i,t]||  (ablation: no token weight)"""
    return stats.gate_norm


def _easy_ep_no_norm(stats: ExpertStats, seed: int) -> torch.Tensor:
    """I[l, i] = sum_t g[i,t] * s[t]  (ablation: no output norm)"""
    return stats.gate_token


def _gating(stats: ExpertStats, seed: int) -> torch.Tensor:
    """I[l, i] = sum_t g[i,t]"""
    return stats.gate


def _frequency(stats: ExpertStats, seed: int) -> torch.Tensor:
    """I[l, i] = sum_t [t chose i]"""
    return stats.frequency


def _random(stats: ExpertStats, seed: int) -> torch.Tensor:
    """I[l, i] ~ U[0, 1) from `seed`; only the shape of `stats` matters."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(len(stats.layer_ids), stats.n_experts, generator=generator, dtype=torch.float64)


SCORERS: dict[str, Callable[[ExpertStats, int], torch.Tensor]] = {
    "easy_ep": _easy_ep,
    "easy_ep_no_token": _easy_ep_no_token,
    "easy_ep_no_norm": _easy_ep_no_norm,
    "gating": _gating,
    "frequency": _frequency,
    "random": _random,
}


def score(stats: ExpertStats, method: str, seed: int = 0) -> torch.Tensor:
    """Scores [L, E] float64 on the CPU, row l for model layer stats.layer_ids[l]; higher = keep."""
    if method not in SCORERS:
        raise ValueError(f"unknown method {method!r}; supported: {', '.join(SCORERS)}")
    return SCORERS[method](stats, seed).to("cpu", torch.float64, copy=True)  # [L, E]


def normalize_layers(scores: torch.Tensor) -> torch.Tensor:
    """P[l, i] = S[l, i] / sum_j S[l, j]; a layer whose scores sum to 0 stays 0."""
    if not torch.isfinite(scores).all() or (scores < 0).any():
        raise ValueError("scores must be finite and non-negative to be normalised per layer")
    totals = scores.sum(dim=1, keepdim=True)  # [L, 1]
    return scores / torch.where(totals > 0, totals, torch.ones_like(totals))  # [L, E]


def mix_domains(domain_scores: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """Mixed-domain score M[l, i] = sum_d w_d * S_d[l, i] / sum_j S_d[l, j] (weights default to 1),
    so each domain counts by its weight whatever the scale of its statistics."""
    if not domain_scores:
        raise ValueError("no domain scores to mix")
    weights = [1.0] * len(domain_scores) if weights is None else [float(w) for w in weights]
    if len(weights) != len(domain_scores):
        raise ValueError(f"{len(weights)} domain weights for {len(domain_scores)} domains; give one weight per domain")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) == 0:
        raise ValueError(f"domain weights {weights} must be finite, non-negative and not all 0")
    shapes = {tuple(s.shape) for s in domain_scores}
    if len(shapes) != 1:
        raise ValueError(f"domain scores have different shapes {sorted(shapes)}; score one model's layers only")
    return sum(w * normalize_layers(s) for w, s in zip(weights, domain_scores))  # [L, E]


def keep_for_ratio(ratio: float, spec: MoESpec, multiple_of: int = 1) -> int:
    """Experts kept per layer for a keep ratio: round(ratio * n_experts / N) * N, halves up, at most
    n_experts (N = multiple_of)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"keep ratio {ratio} must be in (0, 1]")
    _check_multiple_of(multiple_of, spec)
    keep = min(math.floor(ratio * spec.n_experts / multiple_of + 0.5), spec.n_experts // multiple_of) * multiple_of
    if keep < spec.top_k:
        raise ValueError(
            f"keep ratio {ratio} keeps {keep} of {spec.n_experts} experts < top_k={spec.top_k}; "
            f"use a ratio of at least {spec.top_k / spec.n_experts:.4g}"
        )
    return keep


def select_uniform(scores: torch.Tensor, spec: MoESpec, keep: int, multiple_of: int = 1) -> dict[int, list[int]]:
    """The top-`keep` experts of every MoE layer (repaired for group reachability)."""
    _check_scores(scores, spec)
    _check_multiple_of(multiple_of, spec)
    if keep % multiple_of:
        low = keep - keep % multiple_of
        raise ValueError(f"keep={keep} is not a multiple of {multiple_of}; keep {low} or {low + multiple_of}")
    if keep < spec.top_k:
        raise ValueError(f"keep={keep} < top_k={spec.top_k}: every token needs top_k experts; keep at least {spec.top_k}")
    if keep > spec.n_experts:
        raise ValueError(f"keep={keep} > n_experts={spec.n_experts}; keep at most {spec.n_experts}")
    return {layer: select_layer(row, spec, keep) for layer, row in zip(spec.moe_layers, scores.tolist())}


def select_budget(scores: torch.Tensor, spec: MoESpec, budget: int, multiple_of: int = 1) -> dict[int, list[int]]:
    """Keep `budget` experts in total over the MoE layers, the count M_l varying per layer in steps
    of N = multiple_of (N = 1: any count; N = EP size: counts that expert parallelism can split).

    Rule: put each layer's scores on one scale as shares of the layer's total,
        P[l, i] = S[l, i] / sum_j S[l, j]   (a layer summing to 0 has shares 0),
    give every layer its best m0 = ceil(top_k / N) * N experts (the fewest a layer can serve with),
    then hand out the other budget - L * m0 places N at a time: each chunk is a layer's next N
    experts in its ranking, worth the sum of their shares, and the best chunks over all layers win,
    ties by layer then position. Shares fall along each layer's ranking, so chunk values do too,
    every layer keeps a prefix of it (its top-M_l), and the result maximises
    sum_l (share of layer l's score kept) subject to sum_l M_l = budget, M_l >= m0, N | M_l:
    a layer whose score is spread over many experts keeps more than one dominated by a few.
    Each set is then repaired like select_uniform's.
    """
    _check_scores(scores, spec)
    _check_multiple_of(multiple_of, spec)
    n_layers, step = len(spec.moe_layers), multiple_of
    floor = -(-spec.top_k // step) * step  # m0
    low, high = n_layers * floor, n_layers * (spec.n_experts - spec.n_experts % step)
    if not low <= budget <= high:
        least = f"top_k={spec.top_k}" if step == 1 else f"top_k={spec.top_k} rounded up to {floor}"
        most = "every expert" if spec.n_experts % step == 0 else f"{high // n_layers} per layer"
        raise ValueError(f"budget={budget} must be between {low} ({least} in each of {n_layers} MoE layers) and {high} ({most})")
    if budget % step:
        low_budget = budget - budget % step
        raise ValueError(f"budget={budget} is not a multiple of {step}; use {low_budget} or {low_budget + step}")
    shares = normalize_layers(scores).tolist()  # [L][E]
    rankings = [rank_experts(row) for row in shares]
    chunks = sorted(
        (-sum(shares[l][e] for e in ranking[start : start + step]), l, start)
        for l, ranking in enumerate(rankings)
        for start in range(floor, high // n_layers, step)
    )
    counts = [floor] * n_layers
    for _, l, _ in chunks[: (budget - low) // step]:
        counts[l] += step
    return {layer: select_layer(shares[l], spec, counts[l]) for l, layer in enumerate(spec.moe_layers)}


def rank_experts(row: list[float]) -> list[int]:
    """Expert ids by score descending, then expert id ascending (a stable, explicit order)."""
    return sorted(range(len(row)), key=lambda e: (-row[e], e))


def select_layer(row: list[float], spec: MoESpec, keep: int) -> list[int]:
    """The top-`keep` experts of one layer, repaired if the group-limited router could starve it."""
    kept = rank_experts(row)[:keep]
    return sorted(kept) if top_k_always_reachable(spec, kept) else repair_groups(kept, row, spec)


def repair_groups(kept: list[int], row: list[float], spec: MoESpec) -> list[int]:
    """Make `kept` pass group reachability (ExpertMask.resolve) with the same count M.

    An invalid set spreads its experts over too many thin groups, so the router can pick
    topk_group groups holding fewer than top_k of them. Rule, repeated until the set is valid:
      victim   = the non-empty group with the fewest kept experts
                 (ties: lowest kept-score sum, then highest group id);
      drop       the victim's lowest-scored kept expert (ties: highest id);
      add        the best-scored pruned expert (ties: lowest id) of a group other than the victim
                 that holds at least as many kept experts as the victim and has room.
    Each move goes from a group of c_v to one of c_r >= c_v experts, so sum_g c_g^2 grows by
    2 (c_r - c_v + 1) >= 2 while staying <= M^2: the loop ends. Empty groups never receive, so the
    set concentrates; once at most topk_group groups hold experts, every reachable choice holds all
    M >= top_k of them. If no group can receive before the set is valid, MaskError says so.
    """
    kept = set(kept)
    ranking = rank_experts(row)
    while not top_k_always_reachable(spec, kept):
        counts = [0] * spec.n_group
        totals = [0.0] * spec.n_group
        for e in kept:
            counts[spec.group_of(e)] += 1
            totals[spec.group_of(e)] += row[e]
        victim = min((g for g in range(spec.n_group) if counts[g]), key=lambda g: (counts[g], totals[g], -g))
        receivers = {
            g for g in range(spec.n_group) if g != victim and counts[victim] <= counts[g] < spec.group_size
        }
        added = next((e for e in ranking if e not in kept and spec.group_of(e) in receivers), None)
        if added is None:
            raise MaskError(
                f"cannot keep {len(kept)} experts so that every choice of topk_group={spec.topk_group} of "
                f"{spec.n_group} groups offers top_k={spec.top_k}; choose another keep count"
            )
        dropped = min((e for e in kept if spec.group_of(e) == victim), key=lambda e: (row[e], -e))
        kept.remove(dropped)
        kept.add(added)
    return sorted(kept)


def _check_multiple_of(multiple_of: int, spec: MoESpec) -> None:
    if not 1 <= multiple_of <= spec.n_experts:
        raise ValueError(f"multiple of {multiple_of}: use a count between 1 and n_experts={spec.n_experts}")


def _check_scores(scores: torch.Tensor, spec: MoESpec) -> None:
    want = (len(spec.moe_layers), spec.n_experts)
    if tuple(scores.shape) != want:
        raise ValueError(f"scores are {list(scores.shape)} but {spec.architecture} has {list(want)} (MoE layers, experts)")
    if not torch.isfinite(scores).all():
        raise ValueError("scores hold NaN or inf; check the statistics they came from")
