"""Train the multi-domain demo MoE (DeepSeek-V3 architecture) on the CPU and write an HF checkpoint.

    python -m easyep_sglang.demo.trained.train --out DIR [--steps N | --minutes M] [--threads N]

Each training row is `<bos>` + SEQ_LEN-1 characters of one domain, drawn by DOMAIN_WEIGHTS: fresh
arithmetic lines for math, a random window of the training split for code and prose.

Load balancing is DeepSeek-V3's auxiliary-loss-free update, after every optimizer step, per MoE layer:

    b_i <- b_i + rate * sign(mean_j(load_j) - load_i)

where load_i counts the tokens that chose expert i in that step. The bias only steers the top-k choice;
the applied weights are the unbiased sigmoid scores of the chosen experts, so the router weights learn
through them (transformers' DeepseekV3TopkRouter gathers `scores`, which carries the gradient).

The checkpoint is bf16 with `e_score_correction_bias` in fp32, plus `easyep_build.json`: recipe hash,
settings, losses, held-out quality, tokens seen, wall time and library versions.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from easyep_sglang.core.fileio import publish_directory
from easyep_sglang.demo.tiny_models import SUPPORTED_ARCHS, create_model, create_tokenizer
from easyep_sglang.demo.trained import corpus, evaluate

RECIPE_FILES = ("corpus.py", "train.py")  # what decides the weights; evaluate.py only measures them
MODEL_OVERRIDES = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=5, first_k_dense_replace=1,
    num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2, moe_intermediate_size=128,
)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    minutes: float | None = 42.0  # the schedule runs on wall time ...
    steps: int | None = None  # ... or, when steps is set instead, on optimizer steps
    batch_size: int = 8  # twice the optimizer steps of 16 for the same tokens, at ~10% less throughput
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    bias_update_rate: float = 1e-3
    domain_weights: tuple[tuple[str, float], ...] = (("math", 0.7), ("code", 0.15), ("prose", 0.15))
    threads: int = 1
    log_every: int = 20
    model_overrides: tuple[tuple[str, object], ...] = tuple(MODEL_OVERRIDES.items())


def recipe_hash() -> str:
    digest = hashlib.sha256()
    for name in RECIPE_FILES:
        digest.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


class RowSampler:
    """Seeded training rows, [seq_len] token ids each, labelled with their domain."""

    def __init__(self, config: TrainConfig, tokenizer):
        self.config = config
        self.rng = random.Random(config.seed)
        self.domains, self.weights = zip(*config.domain_weights)
        self.math_lines = corpus.math_training_lines(config.seed)
        self.char_to_id = torch.zeros(128, dtype=torch.long)  # [128] ascii -> token id
        for char, token_id in tokenizer.get_vocab().items():
            if len(char) == 1:
                self.char_to_id[ord(char)] = token_id
        self.texts = {d: self._encode(corpus.domain_text(d, held_out=False)) for d in ("code", "prose")}
        self.bos_id = tokenizer.bos_token_id

    def _encode(self, text: str) -> torch.Tensor:
        return self.char_to_id[torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long()]

    def row(self) -> tuple[str, torch.Tensor]:
        domain = self.rng.choices(self.domains, self.weights)[0]
        length = self.config.seq_len - 1
        if domain == "math":
            text = ""
            while len(text) < length:
                text += next(self.math_lines) + "\n"
            body = self._encode(text[:length])
        else:
            tokens = self.texts[domain]
            start = self.rng.randrange(len(tokens) - length)
            body = tokens[start : start + length]
        return domain, torch.cat([torch.tensor([self.bos_id]), body])

    def batch(self) -> tuple[list[str], torch.Tensor]:
        domains, rows = zip(*(self.row() for _ in range(self.config.batch_size)))
        return list(domains), torch.stack(rows)  # [B], [B, T]


class ExpertLoadBalancer:
    """Counts top-k choices per MoE layer and applies the aux-loss-free bias update."""

    def __init__(self, model, rate: float):
        self.gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
        self.rate = rate
        self.loads = torch.zeros(len(self.gates), self.gates[0].weight.shape[0])  # [L, E]
        for layer, gate in enumerate(self.gates):
            gate.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def count(module, inputs, output):
            topk_indices = output[2]  # [T, K]
            self.loads[layer] += torch.bincount(topk_indices.flatten(), minlength=self.loads.shape[1])
        return count

    @torch.no_grad()
    def update(self) -> float:
        """Apply the bias update; returns the worst max/mean load ratio of this step."""
        imbalance = (self.loads.max(1).values / self.loads.mean(1)).max().item()
        for gate, load in zip(self.gates, self.loads):
            gate.e_score_correction_bias += self.rate * torch.sign(load.mean() - load)
        self.loads.zero_()
        return imbalance


def _lr_scale(config: TrainConfig, step: int, progress: float) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def train(config: TrainConfig, tokenizer) -> tuple[torch.nn.Module, dict]:
    assert (config.minutes is None) != (config.steps is None), "set exactly one of minutes and steps"
    torch.manual_seed(config.seed)
    model = create_model(SUPPORTED_ARCHS["deepseek_v3"], len(tokenizer), config.seed, torch.float32,
                         dict(config.model_overrides)).train()
    balancer = ExpertLoadBalancer(model, config.bias_update_rate)
    for gate in balancer.gates:
        gate.e_score_correction_bias.zero_()  # DeepSeek-V3 starts from zero; the update grows it
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    sampler = RowSampler(config, tokenizer)
    loss_ema = {d: None for d, _ in config.domain_weights}
    start, step, tokens_seen = time.monotonic(), 0, 0
    while True:
        elapsed = time.monotonic() - start
        progress = step / config.steps if config.steps else elapsed / (config.minutes * 60)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_scale(config, step, progress)
        domains, input_ids = sampler.batch()  # [B], [B, T]
        logits = model(input_ids=input_ids).logits[:, :-1]  # [B, T-1, V]
        row_losses = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none").mean(1)  # [B]
        optimizer.zero_grad(set_to_none=True)
        row_losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        imbalance = balancer.update()
        for domain, loss in zip(domains, row_losses.tolist()):
            loss_ema[domain] = loss if loss_ema[domain] is None else 0.98 * loss_ema[domain] + 0.02 * loss
        step, tokens_seen = step + 1, tokens_seen + input_ids.numel()
        if step % config.log_every == 0:
            losses = " ".join(f"{d}={v:.3f}" for d, v in loss_ema.items() if v is not None)
            elapsed = time.monotonic() - start
            print(f"step {step} tokens {tokens_seen} {tokens_seen / elapsed:.0f} tok/s lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"loss {losses} max/mean load {imbalance:.2f} elapsed {elapsed / 60:.1f} min", flush=True)
    seconds = time.monotonic() - start
    stats = {"steps": step, "tokens_seen": tokens_seen, "train_seconds": round(seconds, 1),
             "tokens_per_second": round(tokens_seen / seconds, 1),
             "final_train_loss_ema": {d: round(v, 4) for d, v in loss_ema.items() if v is not None}}
    return model.eval(), stats


def _save_bf16(model, directory: Path) -> None:
    model = copy.deepcopy(model)
    biases = [(m, m.e_score_correction_bias) for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    model.to(torch.bfloat16)
    for module, bias in biases:  # fp32, as DeepSeek-V3's release and create_model keep it
        module.e_score_correction_bias = bias
    model.save_pretrained(directory)


def held_out_quality(directory: Path, math_problems: int, passages: int) -> dict:
    """Quality of the checkpoint as written (bf16), on the held-out splits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    problems = list(corpus.math_eval_problems()[:math_problems])
    texts = {d: corpus.passages(d, True, passages, corpus.PASSAGE_CHARS) for d in ("code", "prose")}
    texts["math"] = [p.line for p in problems[:passages]]
    gate_sums = {d: evaluate.gate_score_sums(model, tokenizer, t) for d, t in texts.items()}
    return {
        "math_exact_match": evaluate.math_exact_match(model, tokenizer, problems),
        "math_eval_problems": len(problems),
        "held_out_loss": {d: round(evaluate.mean_token_loss(model, tokenizer, t), 4) for d, t in texts.items()},
        "top2_expert_overlap_per_layer": evaluate.top_expert_overlap(gate_sums, top_m=2),
    }


def write_trained_model(config: TrainConfig, out_dir: Path, math_problems: int = corpus.MATH_EVAL_ROWS,
                        passages: int = corpus.EVAL_PASSAGES) -> dict:
    torch.set_num_threads(config.threads)
    with publish_directory(out_dir) as staging:
        tokenizer = create_tokenizer()
        model, stats = train(config, tokenizer)
        _save_bf16(model, staging)
        tokenizer.save_pretrained(staging, save_jinja_files=False)
        provenance = {
            "builder": "easyep_sglang.demo.trained.train", "recipe_sha256": recipe_hash(),
            "settings": dataclasses.asdict(config), **stats, **held_out_quality(staging, math_problems, passages),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        }
        (staging / "easyep_build.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def _parse_weights(text: str) -> tuple[tuple[str, float], ...]:
    pairs = [item.split("=") for item in text.split(",")]
    if any(len(p) != 2 or p[0] not in corpus.DOMAINS for p in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: write DOMAIN=WEIGHT pairs with domains from {corpus.DOMAINS}")
    return tuple((domain, float(weight)) for domain, weight in pairs)


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m easyep_sglang.demo.trained.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory (replaced if it exists)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=defaults.minutes, help="training wall time (default: %(default)s)")
    budget.add_argument("--steps", type=int, help="train for this many optimizer steps instead of --minutes")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--domain-weights", type=_parse_weights, default=defaults.domain_weights,
                        help="row mix, e.g. math=0.4,code=0.3,prose=0.3 (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"{args.out} exists and is not a directory; choose another --out")
    minutes = None if args.steps else args.minutes
    config = dataclasses.replace(defaults, steps=args.steps, minutes=minutes, threads=args.threads, seed=args.seed,
                                 batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                 domain_weights=args.domain_weights)
    provenance = write_trained_model(config, args.out)
    print(f"easyep: trained demo MoE in {args.out}: math exact match {provenance['math_exact_match']:.2f}, "
          f"held-out loss {provenance['held_out_loss']}, {provenance['tokens_seen']} tokens "
          f"in {provenance['train_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
