"""Miniature reproduction of EASY-EP (arXiv 2504.06792) on the demo MoE, through the product's own pipeline.

    python -m bench.reproduce [--model-path DIR] [--sets-dir DIR] [--out-dir runs/reproduce] [--quick]

1. Calibrate (easyep_sglang.calibrate, prompt + response rows, --use-responses) each domain against one
   recording server, once per sample count k in --sample-counts: calibrate keeps the k longest samples
   (ties: file order), so the k-sample sets are nested and the largest k (all rows) gives the main statistics.
2. Select (easyep_sglang.select) with every method at every pruning ratio from the math statistics, random
   over --random-seeds seeds; mixed-domain rows mix math+code+prose; Table 1 adds each domain's easy_ep mask
   at the first ratio; per-layer budgets (--budget, same total as uniform top-M) for easy_ep on math.
3. Serve each distinct mask, and the full model, through the launcher: one server per mask, stopped after use;
   the next --servers-ahead servers start while one is measured. Configurations whose masks agree share one.
4. Score over the server (bench/reproduce_eval.py): greedy exact match through the accuracy harness, answer
   loss and per-domain loss from SGLang's input-token logprobs.
Rows (one per configuration, with provenance) go to OUT/rows.jsonl; OUT/reproduce.md and the figures are
rendered by bench/reproduce_report.py. --resume continues the file's last run, skipping finished work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import easyep_sglang
from bench.reproduce_eval import EvalSets, answer_continuation, answer_items, measure, serve_in_turn, text_items
from bench.reproduce_figures import domain_overlap, sample_overlap
from bench.reproduce_report import DOMAINS, write_report
from bench.serving import omp_env, sigterm_unwinds
from easyep_sglang import calibrate, select
from easyep_sglang.accuracy import load_problems
from easyep_sglang.mask import ExpertMask
from easyep_sglang.report import append_row, git_commit, read_rows
from easyep_sglang.score import SCORERS, keep_for_ratio, score, select_uniform
from easyep_sglang.server_process import LaunchedServer
from easyep_sglang.spec import MoESpec, spec_from_model_path
from easyep_sglang.stats import ExpertStats, utc_now

DATA_DIR = Path(easyep_sglang.__file__).parent / "data"
SAMPLE_COUNTS = (1, 3, 5, 10, 25)


@dataclass(frozen=True)
class Config:
    name: str
    method: str  # a SCORERS name, or "full"
    calibration: tuple[str, ...] = ()  # domains whose statistics are scored (mixed when several)
    keep: int | None = None  # uniform experts per MoE layer
    budget: int | None = None  # global expert budget over the MoE layers
    seed: int = 0
    prune_ratio: float = 0.0
    tables: tuple[str, ...] = field(default=("table2",))


def plan(args, spec: MoESpec) -> list[Config]:
    """Every configuration, in the tables' row order: the full model, then per pruning ratio each method on math
    (random once per seed) and the mixed rows; Table 1's other domains; the per-layer budgets."""
    n_moe = len(spec.moe_layers)
    keeps = [(ratio, keep_for_ratio(1 - ratio, spec)) for ratio in args.prune_ratios]
    configs = [Config("full", "full", tables=("table2", "table1", "budget"))]
    for i, (ratio, keep) in enumerate(keeps):
        for method in args.methods:
            easy_ep = method == "easy_ep"
            tables = ("table2",) + (("table1",) if easy_ep and i == 0 else ()) + (("budget",) if easy_ep else ())
            configs += [Config(f"{method}-math-keep{keep}-s{seed}", method, ("math",), keep, None, seed, ratio, tables)
                        for seed in range(args.random_seeds if method == "random" else 1)]
        configs += [Config(f"{method}-mixed-keep{keep}", method, DOMAINS, keep, None, 0, ratio)
                    for method in args.mixed_methods]
    ratio, keep = keeps[0]
    configs += [Config(f"easy_ep-{d}-keep{keep}", "easy_ep", (d,), keep, None, 0, ratio, ("table1",))
                for d in DOMAINS[1:]]
    configs += [Config(f"easy_ep-math-budget{keep * n_moe}", "easy_ep", ("math",), None, keep * n_moe, 0, ratio,
                       ("budget",)) for ratio, keep in keeps]
    return configs


def stats_path(out: Path, domain: str, k: int) -> Path:
    return out / "stats" / f"{domain}-k{k}.safetensors"


def calibrate_all(args, out: Path, counts: list[int], server_args: list[str]) -> None:
    """Every (domain, k) statistics file, against one recording server (skipped when all exist)."""
    todo = [(d, k) for d in DOMAINS for k in counts if not stats_path(out, d, k).is_file()]
    if not todo:
        return
    record_dir = out / "stats" / "recorder"
    with LaunchedServer(args.model_path, extra_args=["--record-stats", str(record_dir), *server_args],
                        env=omp_env(args.omp_threads), log_path=out / "logs" / "calibrate.log") as server:
        for domain, k in todo:
            prompts = Path(args.sets_dir) / f"{domain}_calib.jsonl"
            argv = ["--model-path", str(args.model_path), "--prompts", str(prompts), "--domain", domain,
                    "--out", str(stats_path(out, domain, k)), "--num-samples", str(k),
                    "--base-url", server.base_url, "--stats-dir", str(record_dir)]
            argv += ["--use-responses"] if args.use_responses else []
            calibrate.run(calibrate.build_parser().parse_args(argv), [])


def make_mask(args, out: Path, config: Config, k_all: int) -> Path:
    path = out / "masks" / f"{config.name}.json"
    size = ["--keep", str(config.keep)] if config.keep else ["--budget", str(config.budget)]
    argv = ["--stats", *(str(stats_path(out, d, k_all)) for d in config.calibration), "--method", config.method,
            *size, "--seed", str(config.seed), "--model-path", str(args.model_path), "--out", str(path)]
    select.run(select.build_parser().parse_args(argv))
    return path


def eval_sets(args, out: Path, tokenizer) -> EvalSets:
    """The math problems file the harness reads, answer items and each domain's texts, cut to the --num-* sizes."""
    sets = Path(args.sets_dir)
    rows = [line for line in (sets / "math_eval.jsonl").read_text().splitlines() if line.strip()][: args.num_problems]
    data = out / "data" / f"math_eval_{len(rows)}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("\n".join(rows) + "\n")
    problems = load_problems(data)
    texts = {"math": [p.problem + answer_continuation(p.problem, p.answer) for p in problems[: args.num_texts]]}
    for domain in DOMAINS[1:]:
        lines = (sets / f"{domain}_eval.jsonl").read_text().splitlines()
        texts[domain] = [json.loads(line)["text"] for line in lines if line.strip()][: args.num_texts]
    items = {d: text_items(tokenizer, t, args.max_text_tokens) for d, t in texts.items()}
    return EvalSets(data, answer_items(tokenizer, problems), items)


def overlap_rows(args, out: Path, spec: MoESpec, counts: list[int], keeps: list[int], run_id: str) -> list[dict]:
    """Figure 2 and 3 rows, from the statistics files alone; each names the files it read."""
    loaded = {(d, k): ExpertStats.load(stats_path(out, d, k)) for d in DOMAINS for k in counts}
    k_all = counts[-1]
    base = {"kind": "reproduce-overlap", "run_id": run_id, "git_commit": git_commit(), "model": str(args.model_path),
            "model_fingerprint": spec.fingerprint, "n_experts": spec.n_experts, "layers": list(spec.moe_layers),
            "scorer": "easy_ep"}
    def files(keys):
        return [{"path": str(stats_path(out, d, k)), "domain": d, "samples": loaded[d, k][1]["samples"],
                 "token_count": loaded[d, k][1]["token_count"], "sglang_version": loaded[d, k][1].get("sglang_version"),
                 "created": loaded[d, k][1]["created"]} for d, k in keys]
    rows = []
    for m in keeps:
        per_layer, mean = domain_overlap({d: score(loaded[d, k_all][0], "easy_ep") for d in DOMAINS}, m)
        rows.append({**base, "figure": "domains", "m": m, "domains": list(DOMAINS), "per_layer": per_layer,
                     "mean": mean, "stats": files((d, k_all) for d in DOMAINS)})
    for d in DOMAINS:
        for m in keeps:
            selected = {k: select_uniform(score(loaded[d, k][0], "easy_ep"), spec, m) for k in counts}
            per_k = sample_overlap(selected, k_all)
            rows.append({**base, "figure": "samples", "domain": d, "m": m, "samples": counts,
                         "per_layer": [per_k[k] for k in counts],
                         "overlap_mean": [sum(per_k[k]) / len(per_k[k]) for k in counts],
                         "stats": files((d, k) for k in counts)})
    return rows


def run(args) -> str:
    from transformers import AutoTokenizer

    out = Path(args.out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    old = [r for r in read_rows(rows_path) if r.get("kind", "").startswith("reproduce-")] if rows_path.exists() else []
    run_id = old[-1]["run_id"] if args.resume and old else time.strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
    done = {r.get("config") or (r.get("figure"), r.get("domain"), r.get("m")) for r in old if r["run_id"] == run_id}
    spec = spec_from_model_path(args.model_path)
    n_calib = min(sum(1 for line in (Path(args.sets_dir) / f"{d}_calib.jsonl").read_text().splitlines() if line.strip())
                  for d in DOMAINS)
    counts = sorted({k for k in args.sample_counts if k < n_calib} | {n_calib})
    server_args = args.server_args.split()
    if not args.resume:
        for stale in (out / "stats").glob("*.safetensors"):
            stale.unlink()  # a fresh run calibrates afresh
    calibrate_all(args, out, counts, server_args)
    keeps = [keep_for_ratio(1 - r, spec) for r in args.prune_ratios]
    for row in overlap_rows(args, out, spec, counts, keeps, run_id):
        if (row["figure"], row.get("domain"), row["m"]) not in done:
            append_row(rows_path, row)
    planned = plan(args, spec)
    order = {c.name: i for i, c in enumerate(planned)}  # the tables' row order, also when resuming
    configs = [c for c in planned if c.name not in done]
    masks = {c.name: make_mask(args, out, c, counts[-1]) for c in configs if c.method != "full"}
    loaded = {name: ExpertMask.load(path) for name, path in masks.items()}
    digest = {c.name: loaded[c.name].digest() if c.name in loaded else None for c in configs}
    served = {}  # one server per distinct mask: configs whose masks agree share its measurements
    for c in configs:
        served.setdefault(digest[c.name], c)
    sets = eval_sets(args, out, AutoTokenizer.from_pretrained(args.model_path))
    to_serve = [masks.get(c.name) for c in served.values()]
    for mask_path, server, startup_s in serve_in_turn(args.model_path, to_serve, server_args, omp_env(args.omp_threads),
                                                      out / "logs", args.servers_ahead):
        key = ExpertMask.load(mask_path).digest() if mask_path else None
        print(f"easyep: measuring {served[key].name} ({server.base_url})", file=sys.stderr, flush=True)
        measured = {**measure(server, args.model_path, mask_path, sets, args.max_answer_tokens, out / "accuracy.jsonl"),
                    "server_start_s": startup_s, "evaluated_with": served[key].name}
        for config in configs:
            if digest[config.name] == key:
                append_row(rows_path, eval_row(args, spec, config, order[config.name], loaded.get(config.name), measured,
                                               sets, run_id))
    return run_id


def eval_row(args, spec: MoESpec, config: Config, order: int, mask: ExpertMask | None, measured: dict,
             sets: EvalSets, run_id: str) -> dict:
    resolved = mask.resolve(spec) if mask else {}
    return {
        **measured, "kind": "reproduce-eval", "run_id": run_id, "config": config.name, "order": order,
        "method": config.method, "calibration": "mixed" if len(config.calibration) > 1 else (config.calibration or [None])[0],
        "scheme": "full" if not mask else "budget" if config.budget else "uniform", "keep": config.keep,
        "budget": config.budget, "seed": config.seed, "prune_ratio": config.prune_ratio, "tables": list(config.tables),
        "experts_per_layer": [len(resolved.get(l, range(spec.n_experts))) for l in spec.moe_layers],
        "mask_provenance": mask.provenance if mask else None,
        "eval": {"num_problems": len(sets.answers), "num_texts": args.num_texts, "max_text_tokens": args.max_text_tokens,
                 "max_answer_tokens": args.max_answer_tokens, "sets_dir": str(args.sets_dir),
                 "text_tokens": {d: sum(len(i.token_ids) - i.start for i in items) for d, items in sets.texts.items()}},
    }


QUICK = dict(methods=["easy_ep", "random"], random_seeds=1, prune_ratios=[0.5], num_problems=40, num_texts=8,
             max_text_tokens=128)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.reproduce", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model-path", type=Path, default=DATA_DIR / "demo_moe", help="(default: the shipped demo MoE)")
    parser.add_argument("--sets-dir", type=Path, default=DATA_DIR / "demo_sets",
                        help="{math,code,prose}_{calib,eval}.jsonl (default: the shipped demo sets)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/reproduce"), help="rows.jsonl, reproduce.md, figures")
    parser.add_argument("--methods", nargs="+", choices=list(SCORERS), default=list(SCORERS), help="(default: all)")
    parser.add_argument("--mixed-methods", nargs="*", choices=list(SCORERS), default=["easy_ep"],
                        help="methods also run on mixed math+code+prose statistics (default: easy_ep)")
    parser.add_argument("--random-seeds", type=int, default=3, help="seeds of the random method (default: 3)")
    parser.add_argument("--prune-ratios", type=float, nargs="+", default=[0.5, 0.75], help="(default: 0.5 0.75)")
    parser.add_argument("--sample-counts", type=int, nargs="+", default=list(SAMPLE_COUNTS),
                        help="calibration sample counts of Figure 3; all rows are always used (default: 1 3 5 10 25)")
    parser.add_argument("--generate-responses", dest="use_responses", action="store_false",
                        help="calibrate on the model's own answers (T=0.6) instead of the sets' responses")
    parser.add_argument("--num-problems", type=int, default=200, help="math problems scored (default: 200)")
    parser.add_argument("--num-texts", type=int, default=40, help="eval texts per domain for the losses (default: 40)")
    parser.add_argument("--max-text-tokens", type=int, default=256, help="tokens per eval text (default: 256)")
    parser.add_argument("--max-answer-tokens", type=int, default=8, help="greedy tokens per problem (default: 8)")
    parser.add_argument("--omp-threads", type=int, default=1, help="OMP_NUM_THREADS of each server, 0: torch's (default: 1)")
    parser.add_argument("--server-args", default="--mem-fraction-static 0.2",
                        help="launcher/SGLang flags of every server, quoted (default: %(default)s)")
    parser.add_argument("--servers-ahead", type=int, default=1, metavar="N",
                        help="servers starting while one is measured; 0: one server at a time (default: 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--resume", action="store_true", help="continue the last run in OUT/rows.jsonl")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    if not (args.model_path / "config.json").is_file():
        parser.error(f"no model at {args.model_path}; pass --model-path (python -m easyep_sglang.demo_model builds one)")
    started = time.monotonic()
    with sigterm_unwinds():
        run_id = run(args)
    rows_path = args.out_dir / "rows.jsonl"
    append_row(rows_path, {"kind": "reproduce-invocation", "run_id": run_id,
                           "command": ["python", "-m", "bench.reproduce", *argv], "finished": utc_now(),
                           "duration_s": round(time.monotonic() - started, 1), "git_commit": git_commit(),
                           "host_load_1m": round(os.getloadavg()[0], 2)})
    print(write_report(rows_path, run_id).read_text())
    print(f"easyep: reproduction done in {time.monotonic() - started:.0f}s; rows in {rows_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
