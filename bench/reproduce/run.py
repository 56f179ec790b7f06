"""Miniature reproduction of EASY-EP (arXiv 2504.06792) on the demo MoE, through the product's own pipeline.

    python -m bench.reproduce [--model-path DIR] [--sets-dir DIR] [--out-dir runs/reproduce] [--quick]

1. Calibrate (easyep_sglang.serving.calibrate, prompt + response rows, --use-responses) each domain against one
   recording server, once per sample count k in --sample-counts: calibrate keeps the k longest samples
   (ties: file order), so the k-sample sets are nested and the largest k (all rows) gives the main statistics.
2. Select (easyep_sglang.core.selection) with every method at every pruning ratio from the math statistics, random
   over --random-seeds seeds; mixed-domain rows mix math+code+prose; Table 1 adds each domain's easy_ep mask
   at the first ratio; per-layer budgets (--budget, same total as uniform top-M) for easy_ep on math.
3. Serve each distinct mask, and the full model, through the launcher: one server per mask, stopped after use;
   the next --servers-ahead servers start while one is measured. Configurations whose masks agree share one.
4. Score over the server (bench/reproduce/evaluate.py): greedy exact match through the accuracy harness, answer
   loss and per-domain loss from SGLang's input-token logprobs.
Rows (one per configuration, with provenance) go to OUT/rows.jsonl; OUT/reproduce.md and the figures are
rendered by bench/reproduce/report.py. --resume continues the file's last run, skipping finished work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

from bench.reproduce.evaluate import EvalSets, answer_continuation, answer_items, measure, serve_in_turn, text_items
from bench.reproduce.figures import domain_overlap, sample_overlap
from bench.reproduce.plan import QUICK, Config, ReproduceConfig, plan
from bench.reproduce.report import DOMAINS, write_report
from bench.common.serving import omp_env, sigterm_unwinds
from easyep_sglang.core import selection as select
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.score import SCORERS, keep_for_ratio, score, select_uniform
from easyep_sglang.core.spec import MoESpec, spec_from_model_path
from easyep_sglang.core.stats import ExpertStats, utc_now
from easyep_sglang.eval.accuracy import load_problems
from easyep_sglang.eval.provenance import append_row, git_commit, read_rows
from easyep_sglang.serving import calibrate
from easyep_sglang.serving.server_process import LaunchedServer


def stats_path(out: Path, domain: str, k: int) -> Path:
    return out / "stats" / f"{domain}-k{k}.safetensors"


def calibrate_all(repro: ReproduceConfig, out: Path, counts: list[int], server_args: list[str]) -> None:
    """Every (domain, k) statistics file, against one recording server (skipped when all exist)."""
    todo = [(d, k) for d in DOMAINS for k in counts if not stats_path(out, d, k).is_file()]
    if not todo:
        return
    record_dir = out / "stats" / "recorder"
    with LaunchedServer(repro.model_path, extra_args=["--record-stats", str(record_dir), *server_args],
                        env=omp_env(repro.omp_threads), log_path=out / "logs" / "calibrate.log") as server:
        for domain, k in todo:
            prompts = Path(repro.sets_dir) / f"{domain}_calib.jsonl"
            calibrate.run(calibrate.CalibrationConfig(
                repro.model_path, prompts, domain, stats_path(out, domain, k), num_samples=k,
                use_responses=repro.use_responses, base_url=server.base_url, stats_dir=record_dir), [])


def make_mask(repro: ReproduceConfig, out: Path, config: Config, k_all: int) -> Path:
    path = out / "masks" / f"{config.name}.json"
    stats = tuple(str(stats_path(out, d, k_all)) for d in config.calibration)
    select.run(select.SelectionConfig(stats, repro.model_path, path, method=config.method, keep=config.keep,
                                      budget=config.budget, seed=config.seed))
    return path


def eval_sets(repro: ReproduceConfig, out: Path, tokenizer) -> EvalSets:
    """The math problems file the harness reads, answer items and each domain's texts, cut to the --num-* sizes."""
    sets = Path(repro.sets_dir)
    rows = [line for line in (sets / "math_eval.jsonl").read_text().splitlines() if line.strip()][: repro.num_problems]
    data = out / "data" / f"math_eval_{len(rows)}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("\n".join(rows) + "\n")
    problems = load_problems(data)
    texts = {"math": [p.problem + answer_continuation(p.problem, p.answer) for p in problems[: repro.num_texts]]}
    for domain in DOMAINS[1:]:
        lines = (sets / f"{domain}_eval.jsonl").read_text().splitlines()
        texts[domain] = [json.loads(line)["text"] for line in lines if line.strip()][: repro.num_texts]
    items = {d: text_items(tokenizer, t, repro.max_text_tokens) for d, t in texts.items()}
    return EvalSets(data, answer_items(tokenizer, problems), items)


def overlap_rows(repro: ReproduceConfig, out: Path, spec: MoESpec, counts: list[int], keeps: list[int], run_id: str) -> list[dict]:
    """Figure 2 and 3 rows, from the statistics files alone; each names the files it read."""
    loaded = {(d, k): ExpertStats.load(stats_path(out, d, k)) for d in DOMAINS for k in counts}
    k_all = counts[-1]
    base = {"kind": "reproduce-overlap", "run_id": run_id, "git_commit": git_commit(), "model": str(repro.model_path),
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


def run(repro: ReproduceConfig) -> str:
    from transformers import AutoTokenizer

    out = Path(repro.out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    old = [r for r in read_rows(rows_path) if r.get("kind", "").startswith("reproduce-")] if rows_path.exists() else []
    run_id = old[-1]["run_id"] if repro.resume and old else time.strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
    done = {r.get("config") or (r.get("figure"), r.get("domain"), r.get("m")) for r in old if r["run_id"] == run_id}
    spec = spec_from_model_path(repro.model_path)
    n_calib = min(sum(1 for line in (Path(repro.sets_dir) / f"{d}_calib.jsonl").read_text().splitlines() if line.strip())
                  for d in DOMAINS)
    counts = sorted({k for k in repro.sample_counts if k < n_calib} | {n_calib})
    server_args = repro.server_args.split()
    if not repro.resume:
        for stale in (out / "stats").glob("*.safetensors"):
            stale.unlink()  # a fresh run calibrates afresh
    calibrate_all(repro, out, counts, server_args)
    keeps = [keep_for_ratio(1 - r, spec) for r in repro.prune_ratios]
    for row in overlap_rows(repro, out, spec, counts, keeps, run_id):
        if (row["figure"], row.get("domain"), row["m"]) not in done:
            append_row(rows_path, row)
    planned = plan(repro, spec)
    order = {c.name: i for i, c in enumerate(planned)}  # the tables' row order, also when resuming
    configs = [c for c in planned if c.name not in done]
    masks = {c.name: make_mask(repro, out, c, counts[-1]) for c in configs if c.method != "full"}
    loaded = {name: ExpertMask.load(path) for name, path in masks.items()}
    digest = {c.name: loaded[c.name].digest() if c.name in loaded else None for c in configs}
    served = {}  # one server per distinct mask: configs whose masks agree share its measurements
    for c in configs:
        served.setdefault(digest[c.name], c)
    sets = eval_sets(repro, out, AutoTokenizer.from_pretrained(repro.model_path))
    to_serve = [masks.get(c.name) for c in served.values()]
    for mask_path, server, startup_s in serve_in_turn(repro.model_path, to_serve, server_args, omp_env(repro.omp_threads),
                                                      out / "logs", repro.servers_ahead):
        key = ExpertMask.load(mask_path).digest() if mask_path else None
        print(f"easyep: measuring {served[key].name} ({server.base_url})", file=sys.stderr, flush=True)
        measured = {**measure(server, repro.model_path, mask_path, sets, repro.max_answer_tokens, out / "accuracy.jsonl"),
                    "server_start_s": startup_s, "evaluated_with": served[key].name}
        for config in configs:
            if digest[config.name] == key:
                append_row(rows_path, eval_row(repro, spec, config, order[config.name], loaded.get(config.name), measured,
                                               sets, run_id))
    return run_id


def eval_row(repro: ReproduceConfig, spec: MoESpec, config: Config, order: int, mask: ExpertMask | None, measured: dict,
             sets: EvalSets, run_id: str) -> dict:
    resolved = mask.resolve(spec) if mask else {}
    return {
        **measured, "kind": "reproduce-eval", "run_id": run_id, "config": config.name, "order": order,
        "method": config.method, "calibration": "mixed" if len(config.calibration) > 1 else (config.calibration or [None])[0],
        "scheme": "full" if not mask else "budget" if config.budget else "uniform", "keep": config.keep,
        "budget": config.budget, "seed": config.seed, "prune_ratio": config.prune_ratio, "tables": list(config.tables),
        "experts_per_layer": [len(resolved.get(l, range(spec.n_experts))) for l in spec.moe_layers],
        "mask_provenance": mask.provenance if mask else None,
        "eval": {"num_problems": len(sets.answers), "num_texts": repro.num_texts, "max_text_tokens": repro.max_text_tokens,
                 "max_answer_tokens": repro.max_answer_tokens, "sets_dir": str(repro.sets_dir),
                 "text_tokens": {d: sum(len(i.token_ids) - i.start for i in items) for d, items in sets.texts.items()}},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.reproduce", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model-path", type=Path, default=ReproduceConfig.model_path,
                        help="(default: the shipped demo MoE)")
    parser.add_argument("--sets-dir", type=Path, default=ReproduceConfig.sets_dir,
                        help="{math,code,prose}_{calib,eval}.jsonl (default: the shipped demo sets)")
    parser.add_argument("--out-dir", type=Path, default=ReproduceConfig.out_dir,
                        help="rows.jsonl, reproduce.md, figures")
    parser.add_argument("--methods", nargs="+", choices=list(SCORERS), default=ReproduceConfig.methods,
                        help="(default: all)")
    parser.add_argument("--mixed-methods", nargs="*", choices=list(SCORERS), default=ReproduceConfig.mixed_methods,
                        help="methods also run on mixed math+code+prose statistics (default: easy_ep)")
    parser.add_argument("--random-seeds", type=int, default=ReproduceConfig.random_seeds,
                        help="seeds of the random method (default: %(default)s)")
    parser.add_argument("--prune-ratios", type=float, nargs="+", default=ReproduceConfig.prune_ratios,
                        help="(default: 0.5 0.75)")
    parser.add_argument("--sample-counts", type=int, nargs="+", default=ReproduceConfig.sample_counts,
                        help="calibration sample counts of Figure 3; all rows are always used (default: 1 3 5 10 25)")
    parser.add_argument("--generate-responses", dest="use_responses", action="store_false",
                        help="calibrate on the model's own answers (T=0.6) instead of the sets' responses")
    parser.add_argument("--num-problems", type=int, default=ReproduceConfig.num_problems,
                        help="math problems scored (default: %(default)s)")
    parser.add_argument("--num-texts", type=int, default=ReproduceConfig.num_texts,
                        help="eval texts per domain for the losses (default: %(default)s)")
    parser.add_argument("--max-text-tokens", type=int, default=ReproduceConfig.max_text_tokens,
                        help="tokens per eval text (default: %(default)s)")
    parser.add_argument("--max-answer-tokens", type=int, default=ReproduceConfig.max_answer_tokens,
                        help="greedy tokens per problem (default: %(default)s)")
    parser.add_argument("--omp-threads", type=int, default=ReproduceConfig.omp_threads,
                        help="OMP_NUM_THREADS of each server, 0: torch's (default: %(default)s)")
    parser.add_argument("--server-args", default=ReproduceConfig.server_args,
                        help="launcher/SGLang flags of every server, quoted (default: %(default)s)")
    parser.add_argument("--servers-ahead", type=int, default=ReproduceConfig.servers_ahead, metavar="N",
                        help="servers starting while one is measured; 0: one server at a time (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--resume", action="store_true", help="continue the last run in OUT/rows.jsonl")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    options = vars(parser.parse_args(argv))
    del options["quick"]  # applied above: QUICK's values are the defaults
    repro = ReproduceConfig(**options)
    if not (repro.model_path / "config.json").is_file():
        parser.error(f"no model at {repro.model_path}; pass --model-path (python -m easyep_sglang.demo_model builds one)")
    started = time.monotonic()
    with sigterm_unwinds():
        run_id = run(repro)
    rows_path = repro.out_dir / "rows.jsonl"
    append_row(rows_path, {"kind": "reproduce-invocation", "run_id": run_id,
                           "command": ["python", "-m", "bench.reproduce", *argv], "finished": utc_now(),
                           "duration_s": round(time.monotonic() - started, 1), "git_commit": git_commit(),
                           "host_load_1m": round(os.getloadavg()[0], 2)})
    print(write_report(rows_path, run_id).read_text())
    print(f"easyep: reproduction done in {time.monotonic() - started:.0f}s; rows in {rows_path}", file=sys.stderr)
