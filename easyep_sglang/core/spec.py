"""MoESpec: what a model's Mixture-of-Experts looks like, read from its config.json."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROUTER_SIGMOID_BIAS = "sigmoid_bias"  # DeepSeek-V3/R1: sigmoid(logit) + e_score_correction_bias, noaux_tc
ROUTER_SOFTMAX = "softmax"  # DeepSeek-V2, Qwen2-MoE, Qwen3-MoE


@dataclass(frozen=True)
class MoESpec:
    architecture: str
    num_layers: int
    moe_layers: tuple[int, ...]  # decoder layer ids (0-based, as in checkpoint names) that hold routed experts
    mtp_layers: tuple[int, ...]  # DeepSeek next-n (MTP) layer ids; MoE too, never pruned unless a mask names them
    n_experts: int
    top_k: int
    n_group: int  # 1 when routing is not group-limited
    topk_group: int
    router: str
    n_shared_experts: int
    experts_config_key: str  # the config.json key holding the routed-expert count
    fingerprint: str

    @property
    def group_size(self) -> int:
        return self.n_experts // self.n_group

    @property
    def prunable_layers(self) -> tuple[int, ...]:
        return self.moe_layers + self.mtp_layers

    def identity(self) -> dict:
        """The model an artifact (mask, statistics) was made for; readers compare it with theirs."""
        return {"architecture": self.architecture, "num_layers": self.num_layers,
                "n_experts": self.n_experts, "fingerprint": self.fingerprint}

    def group_of(self, expert_id: int) -> int:
        return expert_id // self.group_size

    def describe(self) -> str:
        groups = f", {self.n_group} groups choose {self.topk_group}" if self.n_group > 1 else ""
        return (
            f"{self.architecture}: {len(self.moe_layers)} MoE layers of {self.num_layers}, "
            f"{self.n_experts} experts, top-{self.top_k}{groups}, {self.router} router"
        )


def _fingerprint(config: dict, keys: tuple[str, ...]) -> str:
    subset = {k: config.get(k) for k in keys}
    blob = json.dumps(subset, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]


_SHAPE_KEYS = ("architectures", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")


def _deepseek_spec(config: dict) -> MoESpec:
    num_layers = config["num_hidden_layers"]
    n_experts = config["n_routed_experts"]
    first_dense = config.get("first_k_dense_replace", 0)
    freq = config.get("moe_layer_freq", 1)
    moe_layers = tuple(i for i in range(num_layers) if i >= first_dense and i % freq == 0)
    num_mtp = config.get("num_nextn_predict_layers", 0) or 0
    # transformers' DeepseekV3Config hard-codes V3 routing and may not write these keys.
    v3 = config["architectures"][0] == "DeepseekV3ForCausalLM"
    topk_method = config.get("topk_method", "noaux_tc" if v3 else "greedy")
    sigmoid = config.get("scoring_func", "sigmoid" if v3 else "softmax") == "sigmoid" or topk_method == "noaux_tc"
    grouped = topk_method in ("noaux_tc", "group_limited_greedy")
    n_group = (config.get("n_group") or 1) if grouped else 1
    keys = _SHAPE_KEYS + (
        "n_routed_experts", "num_experts_per_tok", "first_k_dense_replace", "moe_layer_freq",
        "n_group", "topk_group", "topk_method", "moe_intermediate_size", "n_shared_experts",
    )
    return MoESpec(
        architecture=config["architectures"][0],
        num_layers=num_layers,
        moe_layers=moe_layers,
        mtp_layers=tuple(range(num_layers, num_layers + num_mtp)),
        n_experts=n_experts,
        top_k=config["num_experts_per_tok"],
        n_group=n_group,
        topk_group=(config.get("topk_group") or 1) if n_group > 1 else 1,
        router=ROUTER_SIGMOID_BIAS if sigmoid else ROUTER_SOFTMAX,
        n_shared_experts=config.get("n_shared_experts") or 0,
        experts_config_key="n_routed_experts",
        fingerprint=_fingerprint(config, keys),
    )


def _qwen_moe_spec(config: dict) -> MoESpec:
    num_layers = config["num_hidden_layers"]
    experts_key = "num_experts" if "num_experts" in config else "num_local_experts"
    n_experts = config[experts_key]
    step = config.get("decoder_sparse_step", 1) or 1
    dense = set(config.get("mlp_only_layers") or [])
    moe_layers = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    has_shared = bool(config.get("shared_expert_intermediate_size"))
    keys = _SHAPE_KEYS + (
        experts_key, "num_experts_per_tok", "decoder_sparse_step", "mlp_only_layers",
        "moe_intermediate_size", "shared_expert_intermediate_size",
    )
    return MoESpec(
        architecture=config["architectures"][0],
        num_layers=num_layers,
        moe_layers=moe_layers,
        mtp_layers=(),
        n_experts=n_experts,
        top_k=config["num_experts_per_tok"],
        n_group=1,
        topk_group=1,
        router=ROUTER_SOFTMAX,
        n_shared_experts=1 if has_shared else 0,
        experts_config_key=experts_key,
        fingerprint=_fingerprint(config, keys),
    )


SUPPORTED_ARCHITECTURES: dict[str, Callable[[dict], MoESpec]] = {
    "DeepseekV2ForCausalLM": _deepseek_spec,
    "DeepseekV3ForCausalLM": _deepseek_spec,
    "Qwen2MoeForCausalLM": _qwen_moe_spec,
    "Qwen3MoeForCausalLM": _qwen_moe_spec,
}


def spec_from_config(config: dict) -> MoESpec:
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    try:
        spec = SUPPORTED_ARCHITECTURES[arch](config)
    except KeyError as missing:
        raise ValueError(f"config.json of {arch} lacks {missing}; is it a complete Hugging Face config?") from None
    if spec.n_experts % spec.n_group:
        raise ValueError(f"n_routed_experts={spec.n_experts} is not divisible by n_group={spec.n_group}")
    return spec


def load_config(model_path: str | Path) -> dict:
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; --model-path must be a local Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def spec_from_model_path(model_path: str | Path) -> MoESpec:
    return spec_from_config(load_config(model_path))
