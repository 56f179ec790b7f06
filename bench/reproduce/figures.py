"""The statistics-only half of the reproduction: expert-set overlaps (the paper's Figures 2 and 3) and their PNGs.

Overlap of two expert sets of one layer, both of size M: |A & B| / M. Two random M-subsets of E experts
overlap by M/E on average, the chance level each figure shows.
- Figure 2 (domains): A, B = the top-M experts by EASY-EP score of two domains' calibration statistics
  (all samples), before any group repair: a property of the statistics, not of a served mask.
- Figure 3 (samples): A = the set select_uniform keeps (repaired, as served) from the k first-longest
  samples' statistics, B = the set kept from all of them.
"""

from __future__ import annotations

import io

import torch

from easyep_sglang.core.score import rank_experts


def top_sets(scores: torch.Tensor, m: int) -> list[frozenset[int]]:
    """The top-m experts of every row (score descending, then id ascending, as selection ranks them)."""
    return [frozenset(rank_experts(row)[:m]) for row in scores.tolist()]  # L sets


def overlap(a: frozenset[int] | set[int], b: frozenset[int] | set[int]) -> float:
    """|a & b| / max(|a|, |b|): 1 for the same set, 0 for disjoint ones."""
    size = max(len(a), len(b))
    return len(set(a) & set(b)) / size if size else 1.0


def domain_overlap(scores: dict[str, torch.Tensor], m: int) -> tuple[list[list[list[float]]], list[list[float]]]:
    """Per layer [L][D][D] and layer-mean [D][D] overlap of the domains' top-m sets (domains in dict order)."""
    sets = {d: top_sets(s, m) for d, s in scores.items()}  # D x [L]
    domains = list(scores)
    n_layers = len(next(iter(sets.values())))
    per_layer = [[[overlap(sets[a][l], sets[b][l]) for b in domains] for a in domains] for l in range(n_layers)]
    mean = [[sum(per_layer[l][i][j] for l in range(n_layers)) / n_layers for j in range(len(domains))]
            for i in range(len(domains))]
    return per_layer, mean


def sample_overlap(selected: dict[int, dict[int, list[int]]], reference: int) -> dict[int, list[float]]:
    """{k: per-layer overlap of the set kept from k samples with the set kept from `reference` samples}."""
    ref = selected[reference]
    return {k: [overlap(set(keep[layer]), set(ref[layer])) for layer in sorted(ref)] for k, keep in sorted(selected.items())}


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_domain_overlap(rows: list[dict], n_experts: int) -> bytes:
    """One row of heatmaps per M (one panel per MoE layer, then their mean); rows are figure-2 report rows."""
    plt = _pyplot()
    n_cols = max(len(r["layers"]) for r in rows) + 1
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.6 * n_cols, 2.6 * len(rows) + 0.6), squeeze=False)
    for axes_row, row in zip(axes, rows):
        panels = [(f"layer {l}", m) for l, m in zip(row["layers"], row["per_layer"])] + [("mean", row["mean"])]
        for ax, (title, matrix) in zip(axes_row, panels):
            ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
            for i, values in enumerate(matrix):
                for j, v in enumerate(values):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
            ax.set_xticks(range(len(row["domains"])), row["domains"], fontsize=7)
            ax.set_yticks(range(len(row["domains"])), row["domains"], fontsize=7)
            ax.set_title(f"top-{row['m']}, {title}", fontsize=8)
    fig.suptitle(f"Overlap of top-M EASY-EP experts between domains (chance: M/{n_experts})", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def plot_sample_overlap(rows: list[dict], n_experts: int) -> bytes:
    """Layer-mean overlap vs calibration samples, one line per (domain, M); rows are figure-3 report rows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.plot(row["samples"], row["overlap_mean"], marker="o", label=f"{row['domain']}, M={row['m']}")
    for m in sorted({row["m"] for row in rows}):
        ax.axhline(m / n_experts, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ax.set_xticks(rows[0]["samples"], [str(k) for k in rows[0]["samples"]])
    ax.set_xlabel("calibration samples (the longest k)")
    ax.set_ylabel(f"overlap with the set from {rows[0]['samples'][-1]}")
    ax.set_ylim(0, 1.05)
    ax.set_title("Selected experts vs calibration samples (dotted: chance M/E)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)
