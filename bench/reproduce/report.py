"""Render the reproduction's JSONL rows as markdown tables (Tables 1 and 2, per-layer budgets, Figures 2 and 3
as numbers) and PNG figures.

    python -m bench.reproduce.report runs/reproduce/rows.jsonl   # writes reproduce.md, fig2/fig3 PNGs beside it
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.reproduce.figures import plot_domain_overlap, plot_sample_overlap
from easyep_sglang.core.fileio import atomic_write_bytes, atomic_write_text
from easyep_sglang.eval.provenance import read_rows

DOMAINS = ("math", "code", "prose")
METRICS = ("exact_match", "answer_loss", *(f"loss_{d}" for d in DOMAINS))
MIN_RELATIVE_BASE = 0.05  # nats/token


def metric(row: dict, name: str) -> float | None:
    return row["loss"].get(name[5:]) if name.startswith("loss_") else row.get(name)


def aggregate(rows: list[dict]) -> dict[str, tuple[float, float, int]]:
    """{metric: (mean, sample std or 0, n)} over rows of one configuration (random: one row per seed)."""
    out = {}
    for name in METRICS:
        values = [v for v in (metric(r, name) for r in rows) if v is not None]
        if values:
            out[name] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
    return out


def group(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by configuration (method, calibration, scheme, keep, budget): seeds of one configuration together."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["calibration"], r["scheme"], r["keep"], r["budget"]), []).append(r)
    return groups


def fmt(agg: dict, name: str, full: dict | None = None) -> str:
    """mean [±std over seeds] [(share of the full model's exact match, or relative change of a loss)]. A loss
    change relative to a full-model loss under MIN_RELATIVE_BASE (an answer loss near 0) would be noise: the
    absolute change is shown instead."""
    if name not in agg:
        return "—"
    mean, std, n = agg[name]
    percent = name == "exact_match"
    digits = 4 if name == "answer_loss" else 3
    text = f"{100 * mean:.1f}%" if percent else f"{mean:.{digits}f}"
    if n > 1:
        text += f" ±{100 * std:.1f}" if percent else f" ±{std:.{digits}f}"
    if full and name in full:
        base = full[name][0]
        if percent and base:
            text += f" ({100 * mean / base:.0f}% of full)"
        elif not percent and base >= MIN_RELATIVE_BASE:
            text += f" ({100 * (mean / base - 1):+.1f}%)"
        elif not percent:
            text += f" ({mean - base:+.{digits}f})"
    return text


def experts_label(row: dict) -> str:
    counts = row["experts_per_layer"]
    return str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))


def shared_mark(members: list[dict]) -> str:
    """A dagger when a row's mask equals an earlier configuration's, measured once on that one's server."""
    return " †" if any(r.get("evaluated_with", r["config"]) != r["config"] for r in members) else ""


SHARED_NOTE = "† the same mask (digest) as an earlier configuration: one server measured both."


def table2(rows: list[dict]) -> list[str]:
    evals = [r for r in rows if "table2" in r["tables"]]
    full = aggregate([r for r in evals if r["method"] == "full"])
    lines = ["| method | calibration | experts kept per layer | pruned | math exact match | math answer loss | "
             "loss math | loss code | loss prose |", "|---|---|---|---|---|---|---|---|---|"]
    for (method, calibration, _, _, _), members in group(evals).items():
        agg, first = aggregate(members), members[0]
        name = method + (f" (mean of {len(members)} seeds)" if len(members) > 1 else "") + shared_mark(members)
        pruned = f"{100 * first['prune_ratio']:.0f}%" if first["prune_ratio"] else "0%"
        cells = [fmt(agg, m, None if method == "full" else full) for m in METRICS]
        lines.append(f"| {name} | {calibration or '—'} | {experts_label(first)} | {pruned} | " + " | ".join(cells) + " |")
    return lines


def table1(rows: list[dict]) -> list[str]:
    evals = [r for r in rows if "table1" in r["tables"]]
    full = aggregate([r for r in evals if r["method"] == "full"])
    lines = ["| mask (easy_ep, calibrated on) | experts kept per layer | math exact match | loss math | loss code | "
             "loss prose |", "|---|---|---|---|---|---|"]
    for (method, calibration, _, _, _), members in group(evals).items():
        agg, first = aggregate(members), members[0]
        cells = []
        for m in ("exact_match", *(f"loss_{d}" for d in DOMAINS)):
            cell = fmt(agg, m, None if method == "full" else full)
            cells.append(f"**{cell}**" if m.endswith(f"_{calibration}") else cell)  # in-domain cells in bold
        label = "full model" if method == "full" else calibration
        lines.append(f"| {label} | {experts_label(first)} | " + " | ".join(cells) + " |")
    return lines


def budget_table(rows: list[dict]) -> list[str]:
    evals = sorted((r for r in rows if "budget" in r["tables"]), key=lambda r: (r["prune_ratio"], r["scheme"] != "uniform"))
    full = aggregate([r for r in rows if r["method"] == "full"])
    lines = ["| pruned | scheme | experts per MoE layer (total) | math exact match | math answer loss | loss math | "
             "loss code | loss prose |", "|---|---|---|---|---|---|---|---|"]
    for (_, _, scheme, _, _), members in group(evals).items():
        agg, first = aggregate(members), members[0]
        counts = first["experts_per_layer"]
        cells = [fmt(agg, m, None if scheme == "full" else full) for m in METRICS]
        lines.append(f"| {100 * first['prune_ratio']:.0f}% | {scheme} | {'/'.join(map(str, counts))} ({sum(counts)}) | "
                     + " | ".join(cells) + " |")
    return lines


def overlap_tables(rows: list[dict]) -> tuple[list[str], list[str]]:
    fig2 = [r for r in rows if r.get("figure") == "domains"]
    fig3 = [r for r in rows if r.get("figure") == "samples"]
    domains_lines = []
    for r in fig2:
        domains_lines += [f"Top-{r['m']} of {r['n_experts']} (chance {r['m'] / r['n_experts']:.2f}), mean over MoE layers "
                          f"{r['layers']}:", "", "| | " + " | ".join(r["domains"]) + " |",
                          "|---|" + "---|" * len(r["domains"])]
        domains_lines += [f"| {a} | " + " | ".join(f"{v:.2f}" for v in values) + " |" for a, values in zip(r["domains"], r["mean"])]
        domains_lines.append("")
    samples_lines = []
    if fig3:
        samples_lines = ["| domain | M | " + " | ".join(f"{k} samples" for k in fig3[0]["samples"]) + " |",
                         "|---|---|" + "---|" * len(fig3[0]["samples"])]
        samples_lines += [f"| {r['domain']} | {r['m']} | " + " | ".join(f"{v:.2f}" for v in r["overlap_mean"]) + " |"
                          for r in fig3]
    return domains_lines, samples_lines


def header(rows: list[dict]) -> list[str]:
    evals = [r for r in rows if r["kind"] == "reproduce-eval"]
    first = evals[0] if evals else rows[0]
    e = first.get("eval", {})
    lines = [f"# Miniature EASY-EP reproduction, run {first['run_id']}", ""]
    lines += [f"- `{' '.join(r['command'])}`: {r['duration_s']:.0f} s, finished {r['finished']}"
              for r in rows if r["kind"] == "reproduce-invocation"]
    return lines + [
        "",
        f"Model `{first.get('model')}` ({first.get('architecture')}, {first.get('model_fingerprint')}, "
        f"{first.get('n_experts')} routed experts); SGLang {first.get('sglang_version')} on {first.get('device')}; "
        f"git {first.get('git_commit')}; {len(evals)} evaluated configurations, "
        f"{len({r['mask_digest'] for r in evals})} servers.",
        f"Evaluation: {e.get('num_problems')} math problems, greedy exact match through the accuracy harness "
        f"(OpenAI completions API, max {e.get('max_answer_tokens')} tokens, stop at a newline); answer loss = "
        f"mean NLL (nats/token) of the answer tokens given the problem; domain loss = mean NLL per token over "
        f"{e.get('num_texts')} eval texts per domain (at most {e.get('max_text_tokens')} tokens each), from "
        "SGLang's input-token logprobs. Relative changes are to the full model.", ""]


def runs_table(evals: list[dict]) -> list[str]:
    """Where each number came from: one line per configuration."""
    lines = ["| configuration | mask digest | measured on the server of | server start (s) | measuring (s) | "
             "host load (1 min) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['mask_digest'] or '— (full model)'} | {r.get('evaluated_with', r['config'])} | "
              f"{r.get('server_start_s')} | {r.get('eval_s')} | {r.get('host_load_1m')} |" for r in evals]
    return lines


def markdown(rows: list[dict]) -> str:
    evals = sorted((r for r in rows if r["kind"] == "reproduce-eval"), key=lambda r: r.get("order", 0))  # plan order
    fig2, fig3 = overlap_tables([r for r in rows if r["kind"] == "reproduce-overlap"])
    out = header(rows)
    out += ["## Table 2 analogue: methods x pruning ratio (math calibration; mixed = math+code+prose)", ""]
    out += table2(evals)
    if any(shared_mark([r]) for r in evals):
        out += ["", SHARED_NOTE]
    out += ["", "## Table 1 analogue: each domain's mask, in-domain (bold) vs out-of-domain", ""]
    out += table1(evals) + ["", "## Per-layer budgets: uniform top-M vs a global budget (easy_ep, math)", ""]
    out += budget_table(evals) + ["", "## Figure 2 analogue: top-M expert overlap between domains (fig2_domain_overlap.png)", ""]
    out += fig2 + ["## Figure 3 analogue: selected experts vs calibration samples (fig3_sample_overlap.png)", ""]
    out += fig3 + ["", "## Runs (every row in rows.jsonl also carries its full provenance)", ""]
    out += runs_table(evals) + [""]
    return "\n".join(out) + "\n"


def write_report(rows_path: str | Path, run_id: str | None = None) -> Path:
    """Write reproduce.md and the two figures beside the rows (the file's last run by default)."""
    rows_path = Path(rows_path)
    rows = [r for r in read_rows(rows_path) if r.get("kind", "").startswith("reproduce-")]
    if not rows:
        raise ValueError(f"{rows_path} holds no reproduction rows; run python -m bench.reproduce first")
    run_id = run_id or rows[-1]["run_id"]
    rows = [r for r in rows if r["run_id"] == run_id]
    md_path = rows_path.parent / "reproduce.md"
    atomic_write_text(md_path, markdown(rows))
    fig2 = [r for r in rows if r.get("figure") == "domains"]
    fig3 = [r for r in rows if r.get("figure") == "samples"]
    if fig2:
        atomic_write_bytes(rows_path.parent / "fig2_domain_overlap.png", plot_domain_overlap(fig2, fig2[0]["n_experts"]))
    if fig3:
        atomic_write_bytes(rows_path.parent / "fig3_sample_overlap.png", plot_sample_overlap(fig3, fig3[0]["n_experts"]))
    return md_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reproduce.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", help="the reproduction's JSONL rows (bench.reproduce --out-dir X writes X/rows.jsonl)")
    parser.add_argument("--run-id", help="which run in the file (default: the last one)")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.rows, args.run_id).read_text())
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
