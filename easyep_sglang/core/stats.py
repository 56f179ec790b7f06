"""ExpertStats: float64 running sums per (MoE layer, routed expert), the only state calibration keeps.

Merging is addition. Files are safetensors; the header's `__metadata__` holds the format name and
the provenance as JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from easyep_sglang import __version__
from easyep_sglang.core.fileio import atomic_write_bytes
from easyep_sglang.core.spec import MoESpec

FORMAT_NAME = "easyep-stats"
FORMAT_VERSION = "1"
STATISTICS = ("frequency", "gate", "easy_ep", "gate_norm", "gate_token")  # rows of ExpertStats.sums


def _statistic(name: str) -> property:
    row = STATISTICS.index(name)
    return property(lambda self: self.sums[row], doc=f"[L, E] view of the {name} sums")


@dataclass(frozen=True, eq=False)
class ExpertStats:
    """Sums over calibration tokens t for MoE layer l (a row, model layer `layer_ids[l]`) and routed
    expert i. g[i,t] is the applied gate weight (0 unless t chose i), e[i,t] = E_i(x_t) the expert's
    unweighted output, s[t] = max(0, 1 - cos(h_t, h_t + r_t)) the token weight:

        frequency[l, i]  = sum_t [t chose i]
        gate[l, i]       = sum_t g[i,t]
        easy_ep[l, i]    = sum_t g[i,t] * ||e[i,t]||_2 * s[t]
        gate_norm[l, i]  = sum_t g[i,t] * ||e[i,t]||_2
        gate_token[l, i] = sum_t g[i,t] * s[t]
        tokens[l]        = number of tokens layer l routed

    Frozen: the tensors stay the same objects; update() adds into them in place, on their device.
    """

    layer_ids: tuple[int, ...]  # model layer id of each row
    sums: torch.Tensor  # [S, L, E] float64, S rows in STATISTICS order
    tokens: torch.Tensor  # [L] int64

    frequency = _statistic("frequency")
    gate = _statistic("gate")
    easy_ep = _statistic("easy_ep")
    gate_norm = _statistic("gate_norm")
    gate_token = _statistic("gate_token")

    def __post_init__(self):
        n_layers = len(self.layer_ids)
        if self.sums.dim() != 3 or tuple(self.sums.shape[:2]) != (len(STATISTICS), n_layers):
            raise ValueError(f"sums must be [{len(STATISTICS)}, {n_layers}, E], got {list(self.sums.shape)}")
        if self.sums.dtype != torch.float64:
            raise ValueError(f"sums must be float64, got {self.sums.dtype}")
        if tuple(self.tokens.shape) != (n_layers,):
            raise ValueError(f"tokens must be [{n_layers}], got {list(self.tokens.shape)}")

    @classmethod
    def zeros(
        cls,
        spec_or_layer_ids: MoESpec | Sequence[int],
        n_experts: int | None = None,
        device: torch.device | str = "cpu",
    ) -> ExpertStats:
        """`zeros(spec)` covers spec.moe_layers; `zeros(layer_ids, n_experts)` any layers."""
        if isinstance(spec_or_layer_ids, MoESpec):
            layer_ids, n_experts = spec_or_layer_ids.moe_layers, spec_or_layer_ids.n_experts
        elif n_experts is None:
            raise TypeError("zeros(layer_ids, n_experts) needs n_experts")
        else:
            layer_ids = spec_or_layer_ids
        layer_ids = tuple(int(l) for l in layer_ids)
        sums = torch.zeros(len(STATISTICS), len(layer_ids), n_experts, dtype=torch.float64, device=device)  # [S, L, E]
        tokens = torch.zeros(len(layer_ids), dtype=torch.int64, device=device)  # [L]
        return cls(layer_ids, sums, tokens)

    @property
    def n_experts(self) -> int:
        return self.sums.shape[2]

    def index_of(self, layer_id: int) -> int:
        """Row of model layer `layer_id`; look it up once, outside the forward pass."""
        if layer_id not in self.layer_ids:
            raise ValueError(f"layer {layer_id} is not among the recorded MoE layers {list(self.layer_ids)}")
        return self.layer_ids.index(layer_id)

    def update(
        self,
        layer_index: int,
        topk_ids: torch.Tensor,  # [T, k] original expert ids; -1 marks a padded slot
        topk_weights: torch.Tensor,  # [T, k] applied gate weights g
        expert_norms: torch.Tensor,  # [T, k] ||e|| of each chosen expert's unweighted output
        token_weight: torch.Tensor,  # [T] s
    ) -> None:
        """Add one batch of routed tokens of row `layer_index`. No Python loop over tokens and no
        host sync: one index_add_ for all statistics. Inputs must be on the sums' device."""
        valid = topk_ids >= 0  # [T, k]
        ids = topk_ids.clamp(min=0).reshape(-1)  # [T*k]
        g = topk_weights.to(torch.float64) * valid  # [T, k]
        g_norm = g * expert_norms.to(torch.float64)  # [T, k]
        s = token_weight.to(torch.float64).unsqueeze(1)  # [T, 1]
        # Same order as STATISTICS: frequency, gate, easy_ep, gate_norm, gate_token.
        values = torch.stack((valid.to(torch.float64), g, g_norm * s, g_norm, g * s))  # [S, T, k]
        self.sums[:, layer_index].index_add_(1, ids, values.reshape(len(STATISTICS), -1))
        self.tokens[layer_index] += valid.any(dim=1).sum()

    def merge(self, other: ExpertStats) -> ExpertStats:
        """Statistics of both token sets together: plain addition."""
        if other.layer_ids != self.layer_ids or other.n_experts != self.n_experts:
            raise ValueError(
                f"cannot merge statistics of layers {list(other.layer_ids)} x {other.n_experts} experts into "
                f"layers {list(self.layer_ids)} x {self.n_experts} experts; merge statistics of the same model only"
            )
        sums = self.sums + other.sums.to(self.sums.device)  # [S, L, E]
        return ExpertStats(self.layer_ids, sums, self.tokens + other.tokens.to(self.tokens.device))

    def save(self, path: str | Path, provenance: dict) -> None:
        """Write atomically. `provenance` must hold model=spec.identity(); it should also hold
        domain, samples, settings and sglang_version. created, package_version and token_count are
        filled in unless given."""
        model = provenance.get("model")
        if not isinstance(model, dict) or not model.get("fingerprint"):
            raise ValueError("stats provenance must name the model: pass provenance={'model': spec.identity(), ...}")
        full = {
            "created": utc_now(),
            "package_version": __version__,
            "token_count": int(self.tokens.max()) if len(self.layer_ids) else 0,
            **provenance,
        }
        tensors = {name: self.sums[row].cpu().clone() for row, name in enumerate(STATISTICS)}
        tensors["tokens"] = self.tokens.cpu().clone()
        tensors["layer_ids"] = torch.tensor(self.layer_ids, dtype=torch.int64)
        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "provenance": json.dumps(full, sort_keys=True)}
        atomic_write_bytes(path, safetensors_bytes(tensors, metadata=header))

    @classmethod
    def load(cls, path: str | Path) -> tuple[ExpertStats, dict]:
        """(statistics on the CPU, provenance)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"stats file {path} not found; collect statistics with easyep_sglang.calibrate")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except SafetensorError as err:
            raise ValueError(f"{path} is not a safetensors file ({err}); pass a stats file written by ExpertStats.save") from None
        if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is not an {FORMAT_NAME} v{FORMAT_VERSION} file (format {header.get('format')!r}, "
                f"version {header.get('version')!r}); pass a stats file written by ExpertStats.save"
            )
        missing = [name for name in STATISTICS + ("tokens", "layer_ids") if name not in tensors]
        shapes = {tuple(tensors[name].shape) for name in STATISTICS if name in tensors}
        if missing or len(shapes) != 1:
            raise ValueError(f"{path} is damaged (missing {missing}, statistic shapes {sorted(shapes)}); recollect it")
        sums = torch.stack([tensors[name].to(torch.float64) for name in STATISTICS])  # [S, L, E]
        stats = cls(tuple(tensors["layer_ids"].tolist()), sums, tensors["tokens"].to(torch.int64))
        return stats, json.loads(header["provenance"])


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
