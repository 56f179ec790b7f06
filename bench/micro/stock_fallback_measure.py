"""One mask's measurement for `python -m bench.micro.stock_fallback_routing` (steps 3-5 of its docstring): the checkpoint
pruned with the mask and loaded by stock transformers against the original with the mask's biases, on the same
tokens, each MoE layer's chosen experts recorded by a forward hook on its router.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from easyep_sglang.checkpoint.prune import prune_checkpoint
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.routing import PRUNED_BIAS
from easyep_sglang.core.spec import ROUTER_SIGMOID_BIAS, MoESpec, spec_from_model_path


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
            bias[pruned] = PRUNED_BIAS
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


def prune_quietly(model_path: str | Path, mask_path: str | Path, out: Path) -> dict:
    """Prune into `out` (the pruner's log shown only if it fails); the pruned checkpoint's config.json."""
    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            prune_checkpoint(model_path, mask_path, out, force=True)
    except BaseException:
        sys.stderr.write(log.getvalue())
        raise
    return json.loads((out / "config.json").read_text())


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
    pruned_config = prune_quietly(model_path, mask_path, out)
    original = original if original is not None else load_model(model_path)
    with masked_biases(original, kept, spec.n_experts) as source_bias:
        want = run_routing(original, chunks, spec.moe_layers)
    pruned = load_model(out)
    try:
        got = run_routing(pruned, chunks, spec.moe_layers)
    finally:
        del pruned
    biases = {layer: source_bias.get(layer, original.model.layers[layer].mlp.gate.e_score_correction_bias)
              for layer in spec.moe_layers}
    return compare(spec, pruned_config, want, got, biases)


def compare(spec: MoESpec, pruned_config: dict, want: RoutingRun, got: RoutingRun,
            biases: dict[int, torch.Tensor]) -> Measurement:
    """The masked run `want` against the stock run `got` of the checkpoint `pruned_config` describes; `biases`:
    the original model's unmasked e_score_correction_bias per MoE layer."""
    block = pruned_config["easyep"]
    stock_groups = (pruned_config.get("n_group") or 1, pruned_config.get("topk_group") or 1)
    orig_ids = {l: torch.tensor(ids) for l, ids in block["kept"].items()}  # new id -> original id
    layers = spec.moe_layers
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
        choice = (want.logits[layer].sigmoid() + biases[layer])[:, to_orig]
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
