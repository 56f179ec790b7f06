"""The weights of a checkpoint, as (name, bytes, parameters): read from safetensors headers, or estimated
from config.json with the tensor names and shapes a Hugging Face release of that architecture uses."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from easyep_sglang.checkpoint.safetensors_stream import INDEX_NAME, read_header, tensor_nbytes
from easyep_sglang.core.spec import spec_from_config

CONFIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
SCALE_SUFFIXES = ("_scale_inv", "_scale")  # FP8 block scales: storage, not parameters


@dataclass(frozen=True)
class Weight:
    name: str
    nbytes: int
    numel: int  # parameters; 0 for quantization scales


def checkpoint_weights(model_path: str | Path) -> list[Weight]:
    """Every tensor in the model's safetensors shards, from their headers only; [] when there are none."""
    model_path = Path(model_path)
    index = model_path / INDEX_NAME
    if index.is_file():
        shards = sorted({model_path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        shards = sorted(model_path.glob("*.safetensors"))
    weights = []
    for shard in shards:
        for name, info in read_header(shard).tensors.items():
            numel = 0 if name.endswith(SCALE_SUFFIXES) else math.prod(info.shape)
            weights.append(Weight(name, info.nbytes, numel))
    return weights


class _Builder:
    def __init__(self, config: dict):
        self.config = config
        self.dtype = CONFIG_DTYPES[config.get("torch_dtype") or config.get("dtype") or "bfloat16"]
        quant = config.get("quantization_config") or {}
        self.block = quant.get("weight_block_size") if quant.get("quant_method") == "fp8" else None
        self.weights: list[Weight] = []

    def add(self, name: str, shape: tuple[int, ...], dtype: str | None = None) -> None:
        dtype = dtype or self.dtype
        self.weights.append(Weight(name, tensor_nbytes(dtype, shape), math.prod(shape)))

    def linear(self, name: str, out_features: int, in_features: int) -> None:
        """An nn.Linear weight [out, in]; FP8 checkpoints store 1 byte each plus an fp32 scale per block."""
        if not self.block:
            return self.add(f"{name}.weight", (out_features, in_features))
        self.add(f"{name}.weight", (out_features, in_features), "F8_E4M3")
        scales = (math.ceil(out_features / self.block[0]), math.ceil(in_features / self.block[1]))
        self.weights.append(Weight(f"{name}.weight_scale_inv", tensor_nbytes("F32", scales), 0))

    def mlp(self, prefix: str, intermediate: int) -> None:
        hidden = self.config["hidden_size"]
        self.linear(f"{prefix}.gate_proj", intermediate, hidden)
        self.linear(f"{prefix}.up_proj", intermediate, hidden)
        self.linear(f"{prefix}.down_proj", hidden, intermediate)


def _deepseek_layer(b: _Builder, prefix: str, is_moe: bool, is_mtp: bool) -> None:
    c, hidden = b.config, b.config["hidden_size"]
    heads, nope, rope, v = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    attn = f"{prefix}.self_attn"
    if c.get("q_lora_rank"):
        b.linear(f"{attn}.q_a_proj", c["q_lora_rank"], hidden)
        b.add(f"{attn}.q_a_layernorm.weight", (c["q_lora_rank"],))
        b.linear(f"{attn}.q_b_proj", heads * (nope + rope), c["q_lora_rank"])
    else:
        b.linear(f"{attn}.q_proj", heads * (nope + rope), hidden)
    b.linear(f"{attn}.kv_a_proj_with_mqa", c["kv_lora_rank"] + rope, hidden)
    b.add(f"{attn}.kv_a_layernorm.weight", (c["kv_lora_rank"],))
    b.linear(f"{attn}.kv_b_proj", heads * (nope + v), c["kv_lora_rank"])
    b.linear(f"{attn}.o_proj", hidden, heads * v)
    if is_moe:
        experts = c["n_routed_experts"]
        b.add(f"{prefix}.mlp.gate.weight", (experts, hidden))  # routers are never quantized
        if c.get("topk_method") == "noaux_tc":
            b.add(f"{prefix}.mlp.gate.e_score_correction_bias", (experts,), "F32")
        for e in range(experts):
            b.mlp(f"{prefix}.mlp.experts.{e}", c["moe_intermediate_size"])
        if c.get("n_shared_experts"):
            b.mlp(f"{prefix}.mlp.shared_experts", c["moe_intermediate_size"] * c["n_shared_experts"])
    else:
        b.mlp(f"{prefix}.mlp", c["intermediate_size"])
    if is_mtp:  # DeepSeek-V3/R1's next-n layer carries its own embedding, projection and head, in bf16
        vocab = c["vocab_size"]
        for name in ("enorm", "hnorm", "shared_head.norm"):
            b.add(f"{prefix}.{name}.weight", (hidden,))
        b.add(f"{prefix}.eh_proj.weight", (hidden, 2 * hidden))
        b.add(f"{prefix}.embed_tokens.weight", (vocab, hidden))
        b.add(f"{prefix}.shared_head.head.weight", (vocab, hidden))


def _qwen_layer(b: _Builder, prefix: str, is_moe: bool, is_mtp: bool) -> None:
    c, hidden = b.config, b.config["hidden_size"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    attn = f"{prefix}.self_attn"
    b.linear(f"{attn}.q_proj", heads * head_dim, hidden)
    b.linear(f"{attn}.k_proj", kv_heads * head_dim, hidden)
    b.linear(f"{attn}.v_proj", kv_heads * head_dim, hidden)
    b.linear(f"{attn}.o_proj", hidden, heads * head_dim)
    if c["architectures"][0] == "Qwen3MoeForCausalLM":
        b.add(f"{attn}.q_norm.weight", (head_dim,))
        b.add(f"{attn}.k_norm.weight", (head_dim,))
    else:  # Qwen2-MoE: biased q/k/v
        for name, width in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            b.add(f"{attn}.{name}.bias", (width * head_dim,))
    if not is_moe:
        return b.mlp(f"{prefix}.mlp", c["intermediate_size"])
    experts = c.get("num_experts") or c["num_local_experts"]
    b.add(f"{prefix}.mlp.gate.weight", (experts, hidden))
    for e in range(experts):
        b.mlp(f"{prefix}.mlp.experts.{e}", c["moe_intermediate_size"])
    if c.get("shared_expert_intermediate_size"):
        b.mlp(f"{prefix}.mlp.shared_expert", c["shared_expert_intermediate_size"])
        b.add(f"{prefix}.mlp.shared_expert_gate.weight", (1, hidden))


def estimate_weights(config: dict) -> list[Weight]:
    """The tensors a release with this config holds (names, bytes, parameters), without the weights."""
    spec = spec_from_config(config)
    b = _Builder(config)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    b.add("model.embed_tokens.weight", (vocab, hidden))
    b.add("model.norm.weight", (hidden,))
    if not config.get("tie_word_embeddings"):
        b.add("lm_head.weight", (vocab, hidden))
    layer_fn = _deepseek_layer if "kv_lora_rank" in config else _qwen_layer
    for layer in range(spec.num_layers + len(spec.mtp_layers)):
        prefix = f"model.layers.{layer}"
        b.add(f"{prefix}.input_layernorm.weight", (hidden,))
        b.add(f"{prefix}.post_attention_layernorm.weight", (hidden,))
        is_mtp = layer in spec.mtp_layers
        layer_fn(b, prefix, is_moe=layer in spec.moe_layers or is_mtp, is_mtp=is_mtp)
    return b.weights
