"""Render a throughput sweep's JSONL rows as a markdown table and a PNG plot of speedup over the full model.

    python -m bench.sweep.report runs/sweep/sweep.jsonl [--sweep-id ID]   # default: the file's last sweep
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from bench.sweep import same_hardware_report
from bench.sweep.cells import median, provenance_line, ratio_text, setting_label
from easyep_sglang.core.fileio import atomic_write_bytes, atomic_write_text
from easyep_sglang.eval.provenance import read_rows

PAPER_NOTE = (
    "The paper (EASY-EP, Figures 1 and 6) doubled the throughput of configurations that fit on one "
    "8xH800 node (192 experts or fewer) to compare them with the full model on two nodes. The numbers "
    "here are raw: one server per configuration, nothing doubled."
)


def sweep_rows(rows: list[dict], sweep_id: str | None) -> list[dict]:
    rows = [r for r in rows if r.get("kind") == "throughput-sweep"]
    if not rows:
        raise ValueError("no throughput-sweep rows; run python -m bench.sweep first")
    sweep_id = sweep_id or rows[-1]["sweep_id"]
    return [r for r in rows if r["sweep_id"] == sweep_id]


def speedup_grid(rows: list[dict], key: str = "output_throughput") -> tuple[list[str], list[tuple], dict]:
    """(setting labels, (mode, experts) configs, {(mode, experts, label): (runs, median `key`, median ratio)}).

    The ratio of a run is to the full model's run of the same round and setting (rows without a round
    are round 0), so with --rounds the drift of a shared host cancels pairwise; None without a full run."""
    settings = list(dict.fromkeys(setting_label(r) for r in rows))
    configs = list(dict.fromkeys((r["mode"], r["experts"]) for r in rows))
    full = {(r.get("round", 0), setting_label(r)): r.get(key) for r in rows if r["mode"] == "full"}
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        runs.setdefault((r["mode"], r["experts"], setting_label(r)), []).append(r)
    grid = {}
    for cell, cell_runs in runs.items():
        ratios = [r[key] / base for r in cell_runs
                  if r.get(key) and (base := full.get((r.get("round", 0), cell[2])))]
        grid[cell] = (cell_runs, median([r[key] for r in cell_runs if r.get(key)]), median(ratios))
    return settings, configs, grid


def pss_values(rows: list[dict]) -> list[int]:
    """The PSS of the rows that have one: a server on another machine (--base-url) has none."""
    return [r["server_pss_bytes"] for r in rows if r.get("server_pss_bytes") is not None]


def ratio_summary(rows: list[dict]) -> list[str]:
    """Per configuration, over all settings and rounds: median throughput ratios to full, PSS ratio, weight ratio,
    and the memory freed per weight byte pruned (1.0: every pruned byte left the server; PSS also holds the
    runtime and the KV cache, so the PSS ratio itself stays above the weight ratio)."""
    full = [r for r in rows if r["mode"] == "full"]
    if not full:
        return []
    full_pss, full_weights = median(pss_values(full)), full[0].get("weight_bytes")
    _, configs, grid = speedup_grid(rows)
    cpu_grid = speedup_grid(rows, "output_tokens_per_cpu_s")[2]
    lines = ["", "Ratios to the full model (medians over settings of the per-setting medians over rounds):", "",
             "| mode | experts | throughput | per server CPU-s | PSS | served weight bytes (ideal) "
             "| PSS freed / weight bytes freed |",
             "|---|---|---|---|---|---|---|"]
    for mode, experts in configs:
        if mode == "full":
            continue
        cells = [cell for cell in grid if cell[:2] == (mode, experts)]
        throughput = median([grid[c][2] for c in cells if grid[c][2]])
        per_cpu = median([cpu_grid[c][2] for c in cells if cpu_grid[c][2]])
        config_rows = [r for c in cells for r in grid[c][0]]
        pss = median(pss_values(config_rows))
        weights = config_rows[0].get("weight_bytes")
        measured = pss and full_pss
        freed = ((full_pss - pss) / (full_weights - weights)
                 if measured and weights and full_weights and weights < full_weights else None)
        lines.append(f"| {mode} | {experts:g} | {ratio_text(throughput)} | {ratio_text(per_cpu)} | "
                     f"{ratio_text(pss / full_pss if measured else None)} | "
                     f"{ratio_text(weights / full_weights if weights and full_weights else None)} | {ratio_text(freed)} |")
    return lines


def markdown_table(rows: list[dict], skipped: list[str] = ()) -> str:
    settings, configs, grid = speedup_grid(rows)
    cpu_grid = speedup_grid(rows, "output_tokens_per_cpu_s")[2]
    first = rows[0]
    rounds = len({r.get("round", 0) for r in rows})
    header = [
        f"# Throughput sweep {first['sweep_id']}",
        "",
        provenance_line(first),
        f"Concurrency {first['concurrency']}, {first['num_prompts']} prompts per run, lengths x{first['scale']:g}; "
        f"memory budget {first['memory_budget']} (mem_fraction_static {first['mem_fraction_static']}); "
        f"OMP threads {first.get('omp_threads') or 'default'}; host load {first.get('host_load_1m')} at the first run; "
        f"{rounds} round(s), configurations served in turn.",
        "Cells: median output tokens/s (median speedup over the full model of the same round; the same per server "
        "CPU-second, less sensitive to other work on the host). PSS: all server processes, median over runs.",
        "",
        "| mode | experts | PSS (GB) | KV tokens | " + " | ".join(settings) + " |",
        "|---|---|---|---|" + "---|" * len(settings),
    ]
    lines = []
    for mode, experts in configs:
        cells = []
        config_rows = [r for s in settings for r in grid.get((mode, experts, s), ([],))[0]]
        for label in settings:
            runs, throughput, speedup = grid.get((mode, experts, label), ([], None, None))
            cpu_speedup = cpu_grid.get((mode, experts, label), ([], None, None))[2]
            ratios = [f"{x:.2f}x{suffix}" for x, suffix in ((speedup, ""), (cpu_speedup, "/CPU-s")) if x is not None]
            cells.append("—" if throughput is None else f"{throughput:.1f}" +
                         (f" ({', '.join(ratios)})" if ratios else ""))
        pss = median(pss_values(config_rows))
        kv = config_rows[0].get("max_total_num_tokens")
        lines.append(f"| {mode} | {experts:g} | {'—' if pss is None else f'{pss / 1e9:.2f}'} | {kv} | "
                     + " | ".join(cells) + " |")
    footer = ratio_summary(rows) + ["", f"Note: {PAPER_NOTE}"]
    if skipped:
        footer += ["", "Skipped:"] + [f"- {reason}" for reason in skipped]
    return "\n".join(header + lines + footer) + "\n"


def plot_png(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, configs, grid = speedup_grid(rows)
    fig, ax = plt.subplots(figsize=(10, 5))
    styles = {"masked": ("-", "o"), "prune_load": ("--", "s"), "prune_offline": (":", "^")}  # line, marker
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]  # one colour per (input, output) setting
    for k, label in enumerate(settings):
        for mode in [m for m in styles if any(c[0] == m for c in configs)]:
            points = sorted((e, grid[(m, e, label)][2]) for m, e in configs
                            if m in (mode, "full") and (m, e, label) in grid and grid[(m, e, label)][2])
            line, marker = styles[mode]
            if points:
                ax.plot(*zip(*points), line, marker=marker, color=colors[k % len(colors)], label=f"{label}, {mode}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("routed experts kept per MoE layer")
    ax.set_ylabel("output throughput / full model")
    ax.set_title(f"Speedup over the full model, concurrency {rows[0]['concurrency']} ({rows[0]['device']})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.text(0.01, 0.01, "Raw single-server numbers; the paper doubled one-node configurations.", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def write_report(rows_path: str | Path, sweep_id: str | None = None, skipped: list[str] = ()) -> Path:
    """Write sweep.md and sweep.png beside the rows; return the markdown path."""
    rows_path = Path(rows_path)
    rows = sweep_rows(read_rows(rows_path), sweep_id) if rows_path.exists() else []
    md_path, png_path = rows_path.with_suffix(".md"), rows_path.with_suffix(".png")
    if not rows:
        atomic_write_text(md_path, "No runs completed.\n" + "".join(f"- skipped {s}\n" for s in skipped))
        return md_path
    if rows[0].get("layout"):  # bench.sweep --same-hardware
        table, png = same_hardware_report.markdown_table(rows, skipped), same_hardware_report.plot_png(rows)
    else:
        table, png = markdown_table(rows, skipped), plot_png(rows)
    atomic_write_text(md_path, table)
    atomic_write_bytes(png_path, png)
    return md_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", help="the sweep's JSONL file (bench.sweep --out-dir X writes X/sweep.jsonl)")
    parser.add_argument("--sweep-id", help="which sweep in the file (default: the last one)")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.rows, args.sweep_id).read_text())
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
