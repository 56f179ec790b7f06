"""How often a STOCK engine routes a pruned DeepSeek-V3 differently from the masked full model.

    .venv/bin/python -m bench.micro.stock_fallback_routing [--model-path DIR] [--seeds 3] [--keep-ratios 0.5 0.25]

A mask that keeps the same number of experts in every layer but splits the routing groups unevenly is
pruned to the stock fallback `n_group=1, topk_group=1` (plain top-k over the kept experts) and marked
`easyep.stock_engine = "approximate"` (see easyep_sglang/checkpoint/pruned_checkpoint.py). The masked model
instead routes in the source expert space: pruned experts get correction bias -1e4, groups are ranked by their
top-2 biased scores and only `topk_group` groups compete. This script measures the gap, on calibration-like text:

1. build a tiny fp32 DeepSeek-V3 (64 experts, 8 groups choose 4, top-8, 4 MoE layers) or take --model-path;
2. draw seeded random masks with the same count in every layer that pass ExpertMask.resolve and that the
   pruner marks "approximate", at each keep ratio; plus "exact" controls (whole groups, and an even split
   of m >= 2 experts in every group), where the gap must be, and is asserted to be, zero;
3. prune each with easyep_sglang.checkpoint.prune.prune_checkpoint into a temp dir;
4. run the same token sequences through (a) the original model in transformers with the pruned experts'
   e_score_correction_bias set to -1e4 (the masked model) and (b) the pruned checkpoint in stock
   transformers (AutoModelForCausalLM, no plugin), recording each MoE layer's chosen experts with forward
   hooks on `model.model.layers[l].mlp.gate` (DeepseekV3TopkRouter returns (router_logits, topk_weights,
   topk_indices)); pruned ids are mapped back to original ids with config.json["easyep"]["kept"];
5. report, per mask: % of (token, layer) routing decisions whose top-k SET differs; the same for the first
   MoE layer alone (identical input there, so it isolates the router rule); "rule only": the pruned config's
   rule applied to the masked model's own router logits in every layer (no drift of hidden states); the mean
   number of the masked model's top-k experts the stock engine swapped for others; % of positions whose
   greedy next token differs; and max |logprob difference| of the masked model's greedy token (log-softmax,
   over all positions).

Runs single-process on the CPU (default one torch thread); about a minute on a lightly loaded machine.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import json.decoder
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.micro.stock_fallback_measure import Measurement, group_limit_base_rate, load_model, measure
from easyep_sglang.checkpoint.pruned_checkpoint import stock_routing
from easyep_sglang.core.mask import ExpertMask, MaskError, check_group_reachability
from easyep_sglang.core.routing import PRUNED_BIAS
from easyep_sglang.core.spec import MoESpec, spec_from_model_path

# A DeepSeek-V3-like shape, small: 64 experts in 8 groups, routing picks 4 groups then top-8; layers 1-4 MoE.
DEFAULT_SHAPE = dict(n_routed_experts=64, n_group=8, topk_group=4, num_experts_per_tok=8, num_hidden_layers=5)
DEFAULT_KEEP_RATIOS = (0.5, 0.25)
DEFAULT_SEEDS = 3
DEFAULT_SEQ_LEN = 512

LICENSE_PARAGRAPH = """\
Permission is granted to anyone who receives a copy of this small sample text to read it, copy it,
change it and pass it on, with or without changes, for any purpose, provided that this paragraph stays
with every copy. The text comes with no promise of any kind: not that it is correct, not that it suits
a purpose, and not that using it is free of risk. The people who wrote it are not liable for any claim,
damage or loss that arises from the text or from its use, whether in contract, in tort or otherwise.
Where a law does not allow such a disclaimer, the disclaimer applies as far as that law allows.
"""


# ---- text --------------------------------------------------------------------------------------------
def arithmetic_lines(n: int, seed: int = 0) -> str:
    """Q/A lines like "Q: 37+48=? A: 85", answers correct."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-*")
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"Q: {a}{op}{b}=? A: {answer}")
    return "\n".join(lines) + "\n"


def calibration_texts(n_arith: int = 60, source_chars: int = 1400, seed: int = 0) -> dict[str, str]:
    """Three local, calibration-like documents: arithmetic Q/A, Python source, a license paragraph."""
    source = inspect.getsource(json.decoder)[:source_chars]
    return {"arithmetic": arithmetic_lines(n_arith, seed), "json.decoder source": source, "license": LICENSE_PARAGRAPH}


def token_chunks(tokenizer, texts: dict[str, str], seq_len: int = DEFAULT_SEQ_LEN) -> list[torch.Tensor]:
    """Each document tokenized by the model's own tokenizer, cut into sequences of at most seq_len tokens."""
    chunks = []
    for text in texts.values():
        ids = tokenizer(text)["input_ids"]
        chunks += [torch.tensor(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
    return chunks


# ---- masks -------------------------------------------------------------------------------------------
def random_uneven_mask(spec: MoESpec, n_keep: int, rng: random.Random, max_tries: int = 10_000) -> dict[int, list[int]]:
    """Random `n_keep` experts in every MoE layer, each layer passing group reachability, that the pruner
    serves with the stock fallback ("approximate")."""
    for _ in range(max_tries):
        keep = {}
        for layer in spec.moe_layers:
            while True:
                ids = sorted(rng.sample(range(spec.n_experts), n_keep))
                try:
                    check_group_reachability(spec, layer, tuple(ids))
                    break
                except MaskError:
                    continue
            keep[layer] = ids
        if stock_routing(spec, {l: tuple(ids) for l, ids in keep.items()})[3] == "approximate":
            return keep
    raise RuntimeError(f"no approximate mask keeping {n_keep} of {spec.n_experts} found in {max_tries} draws")


def whole_group_mask(spec: MoESpec, n_keep: int, rng: random.Random) -> dict[int, list[int]]:
    """Whole groups, a random choice per layer: exact in a stock engine (n_group = kept groups)."""
    if n_keep % spec.group_size:
        raise ValueError(f"{n_keep} experts is not a whole number of groups of {spec.group_size}")
    keep = {}
    for layer in spec.moe_layers:
        groups = rng.sample(range(spec.n_group), n_keep // spec.group_size)
        keep[layer] = sorted(g * spec.group_size + i for g in groups for i in range(spec.group_size))
    return keep


def even_split_mask(spec: MoESpec, n_keep: int, rng: random.Random) -> dict[int, list[int]]:
    """m = n_keep / n_group random experts in every group: exact in a stock engine when m >= 2 (sigmoid)."""
    if n_keep % spec.n_group:
        raise ValueError(f"{n_keep} experts do not split evenly over {spec.n_group} groups")
    m = n_keep // spec.n_group
    return {layer: sorted(g * spec.group_size + i for g in range(spec.n_group)
                          for i in rng.sample(range(spec.group_size), m)) for layer in spec.moe_layers}


# ---- the benchmark -----------------------------------------------------------------------------------
def plan_masks(spec: MoESpec, keep_ratios, seeds: int) -> list[tuple[str, float, dict[int, list[int]]]]:
    """(name, keep ratio, keep) for the approximate masks and the exact controls."""
    masks = []
    for ratio in keep_ratios:
        n_keep = round(spec.n_experts * ratio)
        if n_keep % spec.group_size == 0:
            masks.append(("whole groups (control)", ratio, whole_group_mask(spec, n_keep, random.Random(1000))))
        if n_keep % spec.n_group == 0 and n_keep // spec.n_group >= 2:
            masks.append((f"even split {n_keep // spec.n_group}/group (control)", ratio,
                          even_split_mask(spec, n_keep, random.Random(2000))))
        for seed in range(seeds):
            masks.append((f"random uneven, seed {seed}", ratio, random_uneven_mask(spec, n_keep, random.Random(seed))))
    return masks


def markdown_table(rows: list[tuple[str, float, Measurement]], layers: tuple[int, ...], top_k: int) -> str:
    head = ["mask", "keep", "stock_engine", "decisions differing, all MoE layers", f"layer {layers[0]} (first MoE)",
            "rule only, all layers", "per layer " + "/".join(map(str, layers)), "experts swapped per decision",
            "greedy token differs",
            "max abs dlogprob (greedy)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ratio, m in rows:
        per_layer = " / ".join(f"{m.per_layer[l]:.1f}" for l in layers)
        lines.append(f"| {name} | {ratio:.0%} | {m.stock_engine} | {m.decisions_pct:.2f}% | {m.first_layer_pct:.2f}% "
                     f"| {m.rule_only_pct:.2f}% | {per_layer} | {m.experts_swapped:.2f} of {top_k} "
                     f"| {m.greedy_differ_pct:.2f}% | {m.max_logprob_diff:.3g} |")
    return "\n".join(lines)


def summary_rows(rows: list[tuple[str, float, Measurement]]) -> str:
    lines = []
    for ratio in sorted({r for _, r, _ in rows}, reverse=True):
        group = [m for _, r, m in rows if r == ratio and m.stock_engine == "approximate"]
        if group:
            mean = lambda f: sum(map(f, group)) / len(group)  # noqa: E731
            lines.append(f"keep {ratio:.0%}, {len(group)} approximate masks: "
                         f"mean {mean(lambda m: m.decisions_pct):.1f}% of routing decisions differ "
                         f"(first MoE layer {mean(lambda m: m.first_layer_pct):.1f}%), "
                         f"greedy token differs at {mean(lambda m: m.greedy_differ_pct):.1f}% of positions")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", help="a DeepSeek-V3 checkpoint (loaded in fp32); default: build a tiny one")
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=list(DEFAULT_KEEP_RATIOS))
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="random uneven masks per keep ratio")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per forward pass")
    parser.add_argument("--n-arith", type=int, default=60, help="arithmetic Q/A lines in the text")
    parser.add_argument("--source-chars", type=int, default=1400, help="characters of json.decoder's source")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return parser.parse_args(argv)


def tiny_model(out: Path) -> Path:
    from easyep_sglang.demo.tiny_models import build_tiny_model

    with contextlib.redirect_stderr(io.StringIO()):
        return build_tiny_model("deepseek_v3", out, dtype="float32", **DEFAULT_SHAPE)


def measure_masks(model_path: Path, spec: MoESpec, chunks: list[torch.Tensor], original, args: argparse.Namespace,
                  tmp: Path) -> list[tuple[str, float, Measurement]]:
    """(name, keep ratio, measurement) of every planned mask; the controls must route exactly as the masked model."""
    rows = []
    for i, (name, ratio, keep) in enumerate(plan_masks(spec, args.keep_ratios, args.seeds)):
        mask_path = tmp / f"mask{i}.json"
        ExpertMask.for_spec(spec, keep, method=f"bench:{name}").save(mask_path)
        m = measure(model_path, mask_path, chunks, tmp / f"run{i}", original=original)
        print(f"easyep: {name}, keep {ratio:.0%}: {m.stock_engine}, {m.decisions_pct:.2f}% of decisions differ",
              file=sys.stderr, flush=True)
        if "control" in name:
            assert m.stock_engine == "exact", f"{name}: the pruner marked it {m.stock_engine}, not exact"
            assert m.decisions_differ == 0, f"{name}: {m.decisions_differ} routing decisions differ; must be 0"
        else:
            assert m.stock_engine == "approximate", f"{name}: the pruner marked it {m.stock_engine}"
        rows.append((name, ratio, m))
    return rows


def settings(args: argparse.Namespace, model_path: Path, spec: MoESpec, texts: dict[str, str],
             chunks: list[torch.Tensor], n_tokens: int, base_rate: dict[int, float]) -> list[str]:
    """The report's settings section, but for its last line (versions and wall time)."""
    default_model = "tiny fp32 DeepSeek-V3 built by demo_model, seed 0, " + json.dumps(DEFAULT_SHAPE)
    return [
        f"- model: {model_path if args.model_path else default_model}",
        f"- routing: {spec.describe()}",
        f"- text: {', '.join(f'{k} ({len(v)} chars)' for k, v in texts.items())}; {n_tokens} tokens "
        f"in {len(chunks)} sequences of <= {args.seq_len}, model's own tokenizer",
        f"- masks: keep ratios {args.keep_ratios}, {args.seeds} random uneven masks per ratio "
        f"(seeds 0..{args.seeds - 1}), same count in every MoE layer, each passing ExpertMask.resolve; "
        "controls: whole groups, even split",
        f"- masked model: original weights, fp32, pruned experts' e_score_correction_bias = {PRUNED_BIAS:g}; stock: "
        f"pruned checkpoint via AutoModelForCausalLM (transformers, no plugin), fp32",
        "- 'rule only': the pruned config's routing rule (for approximate masks n_group=1, topk_group=1: plain "
        "top-k of sigmoid + bias over the kept experts) applied to the masked model's own router logits in every "
        "layer, i.e. without the drift of hidden states from earlier layers",
        "- experts swapped: mean over all (token, layer) decisions of how many of the masked model's "
        f"top-{spec.top_k} experts the stock engine did not choose",
        f"- for scale, the group limit itself: in the UNPRUNED model, group-limited top-{spec.top_k} differs from "
        f"plain top-{spec.top_k} over all experts for " + " / ".join(f"{v:.1f}" for v in base_rate.values())
        + f"% of tokens in layers {'/'.join(map(str, base_rate))}"
        + ("" if args.model_path else " (the tiny model's routers are random, so its groups carry no locality)"),
        "- greedy: argmax next token at every position; dlogprob: log-softmax of the masked model's greedy token, "
        "masked minus stock, max over positions",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="easyep-stock-fallback-") as tmp:
        tmp = Path(tmp)
        model_path = Path(args.model_path) if args.model_path else tiny_model(tmp / "model")
        spec = spec_from_model_path(model_path)
        texts = calibration_texts(args.n_arith, args.source_chars)
        chunks = token_chunks(AutoTokenizer.from_pretrained(model_path), texts, args.seq_len)
        original = load_model(model_path)
        base_rate = group_limit_base_rate(original, spec, chunks)
        rows = measure_masks(model_path, spec, chunks, original, args, tmp)
    print("## Stock-engine routing vs the masked model (DeepSeek-V3 group-limited routing)\n")
    print(markdown_table(rows, spec.moe_layers, spec.top_k))
    print()
    print(summary_rows(rows))
    print("\nRerun:\n")
    print(" ".join(["    .venv/bin/python -m bench.micro.stock_fallback_routing",
                    shlex.join(argv if argv is not None else sys.argv[1:])]).rstrip())
    print("\nSettings:\n")
    print("\n".join(settings(args, model_path, spec, texts, chunks, rows[0][2].n_tokens, base_rate)))
    print(f"- torch {torch.__version__} ({args.threads} thread), transformers {transformers.__version__}, "
          f"{time.time() - started:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
