"""Held-out quality of a demo model in transformers: math exact match, per-domain loss, expert overlap."""

from __future__ import annotations

from itertools import combinations, groupby

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from easyep_sglang.demo.trained.corpus import MathProblem

ANSWER_TOKENS = 6  # " 198\n" is 5 characters; one spare so a runaway answer is not cut into a match


def _encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]  # <bos> + one id per character


@torch.no_grad()
def greedy_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> list[str]:
    """Greedy continuations up to the first newline. Prompts of equal length share a batch, so no padding."""
    encoded = sorted(((len(ids), i, ids) for i, ids in enumerate(_encode(tokenizer, p) for p in prompts)))
    answers = [""] * len(prompts)
    for _, group in groupby(encoded, key=lambda item: item[0]):
        group = list(group)
        input_ids = torch.tensor([ids for _, _, ids in group])  # [B, T]
        for _ in range(ANSWER_TOKENS):
            next_ids = model(input_ids=input_ids).logits[:, -1].argmax(-1)  # [B]
            input_ids = torch.cat([input_ids, next_ids[:, None]], dim=1)
        for (length, index, _), row in zip(group, input_ids):
            answers[index] = tokenizer.decode(row[length:]).split("\n")[0].strip()
    return answers


def math_exact_match(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, problems: list[MathProblem]) -> float:
    answers = greedy_answers(model, tokenizer, [p.prompt for p in problems])
    return sum(a == p.answer for a, p in zip(answers, problems)) / len(problems)


@torch.no_grad()
def mean_token_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> float:
    """Mean next-token cross-entropy (nats) over every token of every text."""
    total, count = 0.0, 0
    for text in texts:
        input_ids = torch.tensor([_encode(tokenizer, text)])  # [1, T]
        logits = model(input_ids=input_ids).logits[0, :-1].float()  # [T-1, V]
        total += F.cross_entropy(logits, input_ids[0, 1:], reduction="sum").item()
        count += input_ids.shape[1] - 1
    return total / count


@torch.no_grad()
def gate_score_sums(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """Sum over tokens of each expert's sigmoid gating score, per MoE layer: [L_moe, E]."""
    gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    sums = torch.zeros(len(gates), gates[0].weight.shape[0], dtype=torch.float64)  # [L, E]

    def record(layer: int):
        def hook(module, inputs, output):
            router_logits = output[0]  # [T, E]
            sums[layer] += router_logits.sigmoid().sum(0).double()
        return hook

    handles = [gate.register_forward_hook(record(layer)) for layer, gate in enumerate(gates)]
    try:
        for text in texts:
            model(input_ids=torch.tensor([_encode(tokenizer, text)]))
    finally:
        for handle in handles:
            handle.remove()
    return sums


def top_expert_overlap(score_sums: dict[str, torch.Tensor], top_m: int = 2) -> dict[str, list[int]]:
    """For each pair of domains, per MoE layer, how many of their top-`top_m` experts they share."""
    top = {domain: sums.topk(top_m, dim=-1).indices.tolist() for domain, sums in score_sums.items()}  # [L][M]
    return {
        f"{a}/{b}": [len(set(ea) & set(eb)) for ea, eb in zip(top[a], top[b])]
        for a, b in combinations(sorted(score_sums), 2)
    }
