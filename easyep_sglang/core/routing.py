"""How a router chooses among kept experts: the rules the mask, the scorer, the pruned checkpoint and the
plugin's gate mask all rely on.

A pruned expert is excluded from routing by a correction bias of PRUNED_BIAS (sigmoid routers, whose scores lie
in (0, 1)) or a -inf logit (softmax routers). With groups, a group's score is the sum of its top-2 choice scores
(sigmoid/noaux_tc) or its best score (softmax): its "score width". So a group with more kept experts, up to that
width, always outranks one with fewer; among groups of equal rank any subset is reachable.
"""

from __future__ import annotations

from easyep_sglang.core.spec import ROUTER_SIGMOID_BIAS, MoESpec

PRUNED_BIAS = -1.0e4  # the e_score_correction_bias a pruned expert gets: below any kept expert's biased score


def group_score_width(spec: MoESpec) -> int:
    """How many of a group's best choice scores add up to the group's score."""
    return 2 if spec.router == ROUTER_SIGMOID_BIAS else 1


def worst_reachable_groups(spec: MoESpec, ids) -> tuple[list[int], int]:
    """(groups, kept experts in them) of the choice of `topk_group` groups that offers the fewest kept experts
    among those the router can make: every higher-ranked group, then the poorest of the boundary rank."""
    width = group_score_width(spec)
    kept_per_group = [0] * spec.n_group
    for e in ids:
        kept_per_group[spec.group_of(e)] += 1
    order = sorted(range(spec.n_group), key=lambda g: (-min(kept_per_group[g], width), kept_per_group[g]))
    worst = sorted(order[: spec.topk_group])
    return worst, sum(kept_per_group[g] for g in worst)


def top_k_always_reachable(spec: MoESpec, ids) -> bool:
    """Whether every choice of groups the router can make offers at least top_k kept experts."""
    return spec.n_group <= 1 or worst_reachable_groups(spec, ids)[1] >= spec.top_k
