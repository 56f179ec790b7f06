"""Render a `bench.sweep --same-hardware` sweep: speedup over the full model on the same devices, and its parts.

The table and plot have the shape of the EASY-EP paper's Figures 1 and 6 (speedup vs experts kept, for each
input x output setting), but every number is measured: each configuration ran in its own deployment shape,
replicas included. Ratios pair each run with the full model's run of the same round and setting; a cell gives
the median over rounds and the spread (min-max).
"""

from __future__ import annotations

import io

from bench.sweep.same_hardware import ALONE, SAME_HARDWARE
from bench.sweep.cells import median, provenance_line, ratio_text, setting_label
from easyep_sglang.checkpoint.capacity import human

KEY = "output_throughput"


def ratios_by_cell(rows: list[dict]) -> tuple[list[str], list[tuple], dict]:
    """(setting labels, (mode, experts, layout) configs, {(config, setting): (throughputs, per-round ratios)})."""
    settings = list(dict.fromkeys(setting_label(r) for r in rows))
    configs = list(dict.fromkeys((r["mode"], r["experts"], r["layout"]) for r in rows))
    full = {(r["round"], setting_label(r)): r[KEY] for r in rows if r["mode"] == "full" and r["layout"] == SAME_HARDWARE}
    cells: dict[tuple, tuple[list, list]] = {}
    for r in rows:
        throughputs, ratios = cells.setdefault(((r["mode"], r["experts"], r["layout"]), setting_label(r)), ([], []))
        throughputs.append(r[KEY])
        if (base := full.get((r["round"], setting_label(r)))) is not None:
            ratios.append(r[KEY] / base)
    return settings, configs, cells


def _cell(throughputs: list[float], ratios: list[float]) -> str:
    spread = f", {min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else ""
    return f"{median(throughputs):.1f} ({median(ratios):.2f}x{spread})" if ratios else f"{median(throughputs):.1f}"


def markdown_table(rows: list[dict], skipped: list[str] = ()) -> str:
    settings, configs, cells = ratios_by_cell(rows)
    first = rows[0]
    rounds = len({r["round"] for r in rows})
    lines = [
        f"# Same-hardware throughput sweep {first['sweep_id']}",
        "",
        provenance_line(first),
        f"Hardware: {first['devices']} devices of {first['device_memory']} each (weights + KV cache); on a CPU a "
        f"device is one core. Concurrency {first['concurrency']}, {first['num_prompts']} prompts per run, lengths "
        f"x{first['scale']:g}; {rounds} round(s), configurations served in turn; host load "
        f"{first.get('host_load_1m')} at the first run.",
        "Cells: median output tokens/s over rounds (median ratio to the full model of the same round and "
        "setting, min-max over rounds).",
        "",
        "| mode | experts | shape | weights/device | KV tokens/replica | " + " | ".join(settings) + " |",
        "|---|---|---|---|---|" + "---|" * len(settings),
    ]
    for config in configs:
        config_rows = [r for r in rows if (r["mode"], r["experts"], r["layout"]) == config]
        first = config_rows[0]
        shape = f"TP={first['shape_tp']} x {first['shape_replicas']}"
        if config[2] == ALONE:
            shape += " (one replica alone)"
        elif first["shape_replicas"] > 1:
            shape += f" ({first['servers']} servers)" if first["servers"] > 1 else f" (--dp-size {first['shape_replicas']})"
        kv = median([r["max_total_num_tokens"] for r in config_rows if r.get("max_total_num_tokens")])
        row_cells = [_cell(*cells[(config, s)]) if (config, s) in cells else "—" for s in settings]
        lines.append(f"| {config[0]} | {config[1]:g} | {shape} | {human(first['weights_per_device'])} | "
                     f"{kv if kv is None else f'{kv:,.0f}'} | " + " | ".join(row_cells) + " |")
    lines += parts_lines(rows, settings, configs, cells)
    if skipped:
        lines += ["", "Skipped:"] + [f"- {reason}" for reason in skipped]
    return "\n".join(lines) + "\n"


def parts_lines(rows: list[dict], settings: list[str], configs: list[tuple], cells: dict) -> list[str]:
    """Why each replicated configuration's ratio is what it is: replicas x (one replica alone / the full model),
    against the measured ratio; their quotient is how well the replicas share the host."""
    replicated = [c for c in configs if c[2] == SAME_HARDWARE and (c[0], c[1], ALONE) in configs]
    if not replicated:
        return []
    lines = ["", "Parts of each ratio (medians over settings of the per-setting medians over rounds):", "",
             "| mode | experts | replicas | one replica alone / full | replicas x that | measured | "
             "measured / (replicas x alone) |", "|---|---|---|---|---|---|---|"]
    for mode, experts, _ in replicated:
        replicas = next(r["shape_replicas"] for r in rows if (r["mode"], r["experts"], r["layout"]) ==
                        (mode, experts, SAME_HARDWARE))
        alone = median([median(cells[((mode, experts, ALONE), s)][1]) for s in settings
                        if cells.get(((mode, experts, ALONE), s), ([], []))[1]])
        measured = median([median(cells[((mode, experts, SAME_HARDWARE), s)][1]) for s in settings
                           if cells.get(((mode, experts, SAME_HARDWARE), s), ([], []))[1]])
        product = alone and replicas * alone
        lines.append(f"| {mode} | {experts:g} | {replicas} | {ratio_text(alone)} | {ratio_text(product)} | "
                     f"{ratio_text(measured)} | {ratio_text(measured and product and measured / product)} |")
    return lines


def plot_png(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, configs, cells = ratios_by_cell(rows)
    fig, ax = plt.subplots(figsize=(9, 5))
    for label in settings:
        points = sorted((experts, ratios) for (mode, experts, layout) in configs if layout == SAME_HARDWARE
                        and (ratios := cells.get(((mode, experts, layout), label), ([], []))[1]))
        if not points:
            continue
        x = [e for e, _ in points]
        y = [median(r) for _, r in points]
        spread = [[m - min(r) for m, (_, r) in zip(y, points)], [max(r) - m for m, (_, r) in zip(y, points)]]
        ax.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("routed experts kept per MoE layer")
    ax.set_ylabel("output throughput / full model, same devices")
    first = rows[0]
    ax.set_title(f"Same hardware: {first['devices']} devices of {first['device_memory']}, concurrency "
                 f"{first['concurrency']} ({first['device']})")
    if ax.get_legend_handles_labels()[0]:  # no full-model run, no ratio to plot
        ax.legend(fontsize=8)
    fig.text(0.01, 0.01, "Measured, nothing doubled: each configuration in its own shape (TP, replicas); "
             "bars: min-max over rounds.", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
