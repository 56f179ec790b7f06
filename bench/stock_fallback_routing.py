"""How often a STOCK engine routes a pruned DeepSeek-V3 differently from the masked full model.

    .venv/bin/python bench/stock_fallback_routing.py [--model-path DIR] [--seeds 3] [--keep-ratios 0.5 0.25]

A mask that keeps the same number of experts in every layer but splits the routing groups unevenly is
pruned to the stock fallback `n_group=1, topk_group=1` (plain top-k over the kept experts) and marked
`easyep.stock_engine = "approximate"` (see easyep_sglang/prune.py). The masked model instead routes in the
source expert space: pruned experts get correction bias -1e4, groups are ranked by their top-2 biased
scores and only `topk_group` groups compete. This script measures the gap, on calibration-like text:

1. build a tiny fp32 DeepSeek-V3 (64 experts, 8 groups choose 4, top-8, 4 MoE layers) or take --model-path;
2. draw seeded random masks with the same count in every layer that pass ExpertMask.resolve and that the
   pruner marks "approximate", at each keep ratio; plus "exact" controls (whole groups, and an even split
   of m >= 2 experts in every group), where the gap must be, and is asserted to be, zero;
3. prune each with easyep_sglang.prune.prune_checkpoint into a temp dir;
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
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from easyep_sglang.mask import ExpertMask, MaskError, check_group_reachability  # noqa: E402
from easyep_sglang.prune import prune_checkpoint  # noqa: E402
from easyep_sglang.pruned_checkpoint import stock_routing  # noqa: E402
from easyep_sglang.spec import ROUTER_SIGMOID_BIAS, MoESpec, spec_from_model_path  # noqa: E402

MASKED_BIAS = -1e4  # what the easyep plugin gives pruned experts' e_score_correction_bias
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


# ---- models and routing capture ----------------------------------------------------------------------
def load_model(path: str | Path):
    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):  # the loading progress bar
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@dataclass
class RoutingRun:
    topk: dict[int, torch.Tensor]  # layer -> [N, top_k] chosen expert ids (the model's own numbering)
    logits: dict[int, torch.Tensor]  # layer -> [N, E] router logits (fp32)
    logprobs: torch.Tensor  # [N, vocab]


@torch.no_grad()
def run_routing(model, chunks: list[torch.Tensor], layers: tuple[int, ...]) -> RoutingRun:
    """Forward every chunk (batch of one), recording each MoE layer's router output."""
    topk: dict[int, list] = {l: [] for l in layers}
    logits: dict[int, list] = {l: [] for l in layers}

    def hook(layer):
        def record(module, inputs, output):
            router_logits, _weights, indices = output
            topk[layer].append(indices.detach().clone())
            logits[layer].append(router_logits.detach().float().clone())
        return record

    handles = [model.model.layers[l].mlp.gate.register_forward_hook(hook(l)) for l in layers]
    try:
        logprobs = [torch.log_softmax(model(chunk[None]).logits[0].float(), dim=-1) for chunk in chunks]
    finally:
        for h in handles:
            h.remove()
    return RoutingRun({l: torch.cat(v) for l, v in topk.items()}, {l: torch.cat(v) for l, v in logits.items()},
                      torch.cat(logprobs))


@contextlib.contextmanager
def masked_biases(model, kept: dict[int, tuple[int, ...]], n_experts: int):
    """The masked full model: pruned experts' e_score_correction_bias set to -1e4, restored afterwards."""
    saved = {}
    with torch.no_grad():
        for layer, ids in kept.items():
            bias = model.model.layers[layer].mlp.gate.e_score_correction_bias
            saved[layer] = bias.clone()
            pruned = torch.ones(n_experts, dtype=torch.bool)
            pruned[list(ids)] = False
            bias[pruned] = MASKED_BIAS
    try:
        yield saved
    finally:
        with torch.no_grad():
            for layer, bias in saved.items():
                model.model.layers[layer].mlp.gate.e_score_correction_bias.copy_(bias)


def differing_sets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows of two [N, k] id tensors whose sets of ids differ."""
    return (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1)


def experts_not_in(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N] int: per row, how many ids of `a` are not in `b` (both [N, k], no repeats within a row)."""
    return (a[:, :, None] != b[:, None, :]).all(dim=-1).sum(dim=-1)


def group_limited_topk(choice: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's noaux_tc selection (as transformers' DeepseekV3TopkRouter) on [N, E] biased scores:
    rank groups by their top-2 scores, keep `topk_group` groups, top-k within them. Returns [N, top_k] ids."""
    n, e = choice.shape
    grouped = choice.view(n, n_group, e // n_group)
    group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(dim=-1)
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
    allowed = group_mask[:, :, None].expand(n, n_group, e // n_group).reshape(n, e)
    return choice.masked_fill(~allowed, float("-inf")).topk(top_k, dim=-1, sorted=False).indices


@dataclass
class Measurement:
    stock_engine: str
    n_tokens: int
    first_layer: int
    per_layer: dict[int, float] = field(default_factory=dict)  # layer -> % of tokens whose top-k set differs
    rule_only: dict[int, float] = field(default_factory=dict)  # layer -> same, stock rule on the masked logits
    decisions_pct: float = 0.0  # % of (token, layer) decisions over all MoE layers
    decisions_differ: int = 0
    experts_swapped: float = 0.0  # mean over all decisions of the masked model's experts the stock one did not pick
    rule_only_pct: float = 0.0
    greedy_differ_pct: float = 0.0
    max_logprob_diff: float = 0.0

    @property
    def first_layer_pct(self) -> float:
        return self.per_layer[self.first_layer]


def measure(model_path: str | Path, mask_path: str | Path, chunks: list[torch.Tensor], work_dir: str | Path,
            original=None) -> Measurement:
    """Prune `model_path` with the mask into `work_dir`, then compare the stock-loaded pruned model's routing
    and greedy tokens with the masked original's on `chunks`. `original`: the original model, already loaded
    (fp32), to reuse across masks; its biases are restored on return."""
    spec = spec_from_model_path(model_path)
    if spec.router != ROUTER_SIGMOID_BIAS:
        raise ValueError(f"{spec.architecture}: this measurement is for DeepSeek-V3 sigmoid + bias routing")
    kept = ExpertMask.load(mask_path).resolve(spec)
    out = Path(work_dir) / "pruned"
    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            prune_checkpoint(model_path, mask_path, out, force=True)
    except BaseException:
        sys.stderr.write(log.getvalue())
        raise
    pruned_config = json.loads((out / "config.json").read_text())
    block = pruned_config["easyep"]
    stock_groups = (pruned_config.get("n_group") or 1, pruned_config.get("topk_group") or 1)
    orig_ids = {l: torch.tensor(ids) for l, ids in block["kept"].items()}  # new id -> original id

    layers = spec.moe_layers
    original = original if original is not None else load_model(model_path)
    with masked_biases(original, kept, spec.n_experts) as source_bias:
        want = run_routing(original, chunks, layers)
    pruned = load_model(out)
    try:
        got = run_routing(pruned, chunks, layers)
    finally:
        del pruned

    n = want.logprobs.shape[0]
    result = Measurement(block["stock_engine"], n, layers[0])
    total_rule, swapped = 0, 0
    for layer in layers:
        to_orig = orig_ids.get(str(layer), torch.arange(spec.n_experts))
        got_ids = to_orig[got.topk[layer]]
        differ = differing_sets(want.topk[layer], got_ids)
        result.per_layer[layer] = 100.0 * differ.float().mean().item()
        result.decisions_differ += int(differ.sum())
        swapped += int(experts_not_in(want.topk[layer], got_ids).sum())
        # The pruned config's rule (for "approximate": plain top-k of sigmoid + bias over the kept experts)
        # applied to the masked run's own router logits, so no drift from earlier layers.
        bias = source_bias.get(layer, original.model.layers[layer].mlp.gate.e_score_correction_bias)
        choice = (want.logits[layer].sigmoid() + bias)[:, to_orig]
        rule_ids = to_orig[group_limited_topk(choice, *stock_groups, spec.top_k)]
        rule_differ = differing_sets(want.topk[layer], rule_ids)
        result.rule_only[layer] = 100.0 * rule_differ.float().mean().item()
        total_rule += int(rule_differ.sum())
    result.decisions_pct = 100.0 * result.decisions_differ / (n * len(layers))
    result.rule_only_pct = 100.0 * total_rule / (n * len(layers))
    result.experts_swapped = swapped / (n * len(layers))
    greedy = want.logprobs.argmax(dim=-1)
    result.greedy_differ_pct = 100.0 * (got.logprobs.argmax(dim=-1) != greedy).float().mean().item()
    result.max_logprob_diff = (want.logprobs.gather(1, greedy[:, None]) - got.logprobs.gather(1, greedy[:, None])
                               ).abs().max().item()
    return result


def group_limit_base_rate(model, spec: MoESpec, chunks: list[torch.Tensor]) -> dict[int, float]:
    """Per MoE layer, % of tokens where the UNPRUNED model's group-limited top-k set differs from plain top-k
    over all experts: how much the group limit matters for this model's routers at all."""
    run = run_routing(model, chunks, spec.moe_layers)
    rates = {}
    for layer in spec.moe_layers:
        choice = run.logits[layer].sigmoid() + model.model.layers[layer].mlp.gate.e_score_correction_bias
        plain = choice.topk(spec.top_k, dim=-1).indices
        rates[layer] = 100.0 * differing_sets(run.topk[layer], plain).float().mean().item()
    return rates


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
                     f"| {m.rule_only_pct:.2f}% | {per_layer} | {m.experts_swapped:.2f} of {top_k} | {m.greedy_differ_pct:.2f}% "
                     f"| {m.max_logprob_diff:.3g} |")
    return "\n".join(lines)


def summary_rows(rows: list[tuple[str, float, Measurement]]) -> str:
    lines = []
    for ratio in sorted({r for _, r, _ in rows}, reverse=True):
        group = [m for _, r, m in rows if r == ratio and m.stock_engine == "approximate"]
        if group:
            mean = lambda f: sum(map(f, group)) / len(group)  # noqa: E731
            lines.append(f"keep {ratio:.0%}, {len(group)} approximate masks: mean {mean(lambda m: m.decisions_pct):.1f}% "
                         f"of routing decisions differ (first MoE layer {mean(lambda m: m.first_layer_pct):.1f}%), "
                         f"greedy token differs at {mean(lambda m: m.greedy_differ_pct):.1f}% of positions")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", help="a DeepSeek-V3 checkpoint (loaded in fp32); default: build a tiny one")
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=list(DEFAULT_KEEP_RATIOS))
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="random uneven masks per keep ratio")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per forward pass")
    parser.add_argument("--n-arith", type=int, default=60, help="arithmetic Q/A lines in the text")
    parser.add_argument("--source-chars", type=int, default=1400, help="characters of json.decoder's source")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="easyep-stock-fallback-") as tmp:
        tmp = Path(tmp)
        if args.model_path:
            model_path = Path(args.model_path)
        else:
            from easyep_sglang.demo_model import build_tiny_model

            with contextlib.redirect_stderr(io.StringIO()):
                model_path = build_tiny_model("deepseek_v3", tmp / "model", dtype="float32", **DEFAULT_SHAPE)
        spec = spec_from_model_path(model_path)
        texts = calibration_texts(args.n_arith, args.source_chars)
        chunks = token_chunks(AutoTokenizer.from_pretrained(model_path), texts, args.seq_len)
        original = load_model(model_path)
        base_rate = group_limit_base_rate(original, spec, chunks)
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
    n_tokens = rows[0][2].n_tokens
    print("## Stock-engine routing vs the masked model (DeepSeek-V3 group-limited routing)\n")
    print(markdown_table(rows, spec.moe_layers, spec.top_k))
    print()
    print(summary_rows(rows))
    print("\nRerun:\n")
    print(" ".join(["    .venv/bin/python bench/stock_fallback_routing.py",
                    shlex.join(argv if argv is not None else sys.argv[1:])]).rstrip())
    print("\nSettings:\n")
    print(f"- model: {model_path if args.model_path else 'tiny fp32 DeepSeek-V3 built by demo_model, seed 0, ' + json.dumps(DEFAULT_SHAPE)}")
    print(f"- routing: {spec.describe()}")
    print(f"- text: {', '.join(f'{k} ({len(v)} chars)' for k, v in texts.items())}; {n_tokens} tokens "
          f"in {len(chunks)} sequences of <= {args.seq_len}, model's own tokenizer")
    print(f"- masks: keep ratios {args.keep_ratios}, {args.seeds} random uneven masks per ratio (seeds 0..{args.seeds - 1}),"
          f" same count in every MoE layer, each passing ExpertMask.resolve; controls: whole groups, even split")
    print(f"- masked model: original weights, fp32, pruned experts' e_score_correction_bias = {MASKED_BIAS:g}; stock: "
          f"pruned checkpoint via AutoModelForCausalLM (transformers, no plugin), fp32")
    print("- 'rule only': the pruned config's routing rule (for approximate masks n_group=1, topk_group=1: plain "
          "top-k of sigmoid + bias over the kept experts) applied to the masked model's own router logits in every "
          "layer, i.e. without the drift of hidden states from earlier layers")
    print(f"- experts swapped: mean over all (token, layer) decisions of how many of the masked model's top-{spec.top_k} "
          "experts the stock engine did not choose")
    print(f"- for scale, the group limit itself: in the UNPRUNED model, group-limited top-{spec.top_k} differs from plain "
          f"top-{spec.top_k} over all experts for " + " / ".join(f"{v:.1f}" for v in base_rate.values())
          + f"% of tokens in layers {'/'.join(map(str, base_rate))}"
          + ("" if args.model_path else " (the tiny model's routers are random, so its groups carry no locality)"))
    print("- greedy: argmax next token at every position; dlogprob: log-softmax of the masked model's greedy token, "
          "masked minus stock, max over positions")
    import transformers

    print(f"- torch {torch.__version__} ({args.threads} thread), transformers {transformers.__version__}, "
          f"{time.time() - started:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
