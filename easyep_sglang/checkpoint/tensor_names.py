"""The checkpoint tensor names of MoE layers, as DeepSeek-V2/V3/R1 and Qwen2/3-MoE releases write them: the one
place that parses them.

    <prefix>layers.<L>.mlp.experts.<E>.<rest>     one routed expert's tensor (<prefix> is e.g. "model.")
    <prefix>layers.<L>.mlp.experts.<name>...      a fused tensor of all routed experts, dim 0 = experts
    <prefix>layers.<L>.mlp.gate.<name>...         the router: `weight` [E, hidden] and DeepSeek-V3's
                                                  `e_score_correction_bias` [E], dim 0 = experts
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.")
_EXPERT = re.compile(r"^(?P<head>(?:.*\.)?layers\.(?P<layer>\d+)\.mlp\.experts\.)(?P<expert>\d+)\.(?P<tail>.+)$")
_ROUTER = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.mlp\.gate\..+$")
_FUSED_EXPERTS = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.mlp\.experts\.[A-Za-z_].*$")


@dataclass(frozen=True)
class ExpertTensor:
    """`head` + expert id + "." + `tail`: one routed expert's tensor."""
    head: str
    layer: int
    expert: int
    tail: str

    def renumbered(self, expert: int) -> str:
        return f"{self.head}{expert}.{self.tail}"


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to; None for embeddings, the final norm and the LM head."""
    return int(m["layer"]) if (m := _LAYER.search(name)) else None


def expert_tensor(name: str) -> ExpertTensor | None:
    if m := _EXPERT.match(name):
        return ExpertTensor(m["head"], int(m["layer"]), int(m["expert"]), m["tail"])
    return None


def router_layer(name: str) -> int | None:
    """The layer of a router tensor (one row per routed expert)."""
    return int(m["layer"]) if (m := _ROUTER.match(name)) else None


def expert_rows_layer(name: str) -> int | None:
    """The layer of a tensor whose dim 0 indexes the routed experts: a router tensor or a fused expert tensor."""
    if (m := _ROUTER.match(name) or _FUSED_EXPERTS.match(name)) is not None:
        return int(m["layer"])
    return None
