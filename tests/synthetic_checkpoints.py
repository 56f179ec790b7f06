"""Synthetic checkpoints with DeepSeek-V3's FP8 and Qwen3-MoE's real tensor layouts, for the offline pruner's tests."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from easyep_sglang.checkpoint import prune
from easyep_sglang.core.mask import ExpertMask

ROOT = Path(__file__).resolve().parents[1]
H, I_MOE, I_DENSE, V, BLOCK = 64, 32, 96, 128, 16  # hidden, expert/dense intermediate, vocab, FP8 block
E = 16  # routed experts; 4 groups of 4, topk_group=2, top_k=4

DEEPSEEK_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "hidden_size": H, "intermediate_size": I_DENSE, "moe_intermediate_size": I_MOE, "vocab_size": V,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_nextn_predict_layers": 1,
    "n_routed_experts": E, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [BLOCK, BLOCK]},
}
EXTRA_FILES = {"tokenizer.json": '{"model": {}}', "tokenizer_config.json": "{}",
               "generation_config.json": '{"do_sample": true}', "assets/notes.txt": "hello"}


def _fp8_linear(prefix: str, out_dim: int, in_dim: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.randn(out_dim, in_dim).to(torch.float8_e4m3fn),
            f"{prefix}.weight_scale_inv": torch.rand(math.ceil(out_dim / BLOCK), math.ceil(in_dim / BLOCK))}


def _mlp(prefix: str, inter: int) -> dict[str, torch.Tensor]:
    return {**_fp8_linear(f"{prefix}.gate_proj", inter, H), **_fp8_linear(f"{prefix}.up_proj", inter, H),
            **_fp8_linear(f"{prefix}.down_proj", H, inter)}


def deepseek_tensors(config: dict) -> dict[str, torch.Tensor]:
    bf16 = lambda *shape: torch.randn(*shape).to(torch.bfloat16)  # noqa: E731
    t = {"model.embed_tokens.weight": bf16(V, H)}
    for layer in range(config["num_hidden_layers"] + config["num_nextn_predict_layers"]):
        p = f"model.layers.{layer}"
        t[f"{p}.input_layernorm.weight"] = bf16(H)
        t.update(_fp8_linear(f"{p}.self_attn.q_a_proj", 32, H))
        t.update(_fp8_linear(f"{p}.self_attn.o_proj", H, 64))
        t[f"{p}.post_attention_layernorm.weight"] = bf16(H)
        if layer < config["first_k_dense_replace"]:
            t.update(_mlp(f"{p}.mlp", I_DENSE))
            continue
        for e in range(E):
            t.update(_mlp(f"{p}.mlp.experts.{e}", I_MOE))
        t[f"{p}.mlp.gate.weight"] = bf16(E, H)
        t[f"{p}.mlp.gate.e_score_correction_bias"] = torch.randn(E)
        t.update(_mlp(f"{p}.mlp.shared_experts", I_MOE))
        if layer >= config["num_hidden_layers"]:  # the MTP (next-n) layer's own modules
            t.update({f"{p}.enorm.weight": bf16(H), f"{p}.hnorm.weight": bf16(H), f"{p}.eh_proj.weight": bf16(H, 2 * H),
                      f"{p}.embed_tokens.weight": bf16(V, H), f"{p}.shared_head.head.weight": bf16(V, H)})
    t["model.norm.weight"] = bf16(H)
    t["lm_head.weight"] = bf16(V, H)
    return t


def write_checkpoint(root: Path, config: dict, tensors: dict[str, torch.Tensor], n_shards: int) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    for rel, text in EXTRA_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    if n_shards == 1:
        save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
        return root
    names = list(tensors)  # in model order, cut in equal runs: a layer's experts straddle shard boundaries
    size = math.ceil(len(names) / n_shards)
    weight_map = {}
    for i in range(n_shards):
        filename = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * size:(i + 1) * size]}
        save_file(part, root / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return root


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def load_all(root: Path) -> dict[str, tuple[torch.Tensor, str]]:
    files = sorted(p.name for p in root.glob("*.safetensors"))
    out = {}
    for filename in files:
        with safe_open(root / filename, "pt") as f:
            out.update({k: (f.get_tensor(k), filename) for k in f.keys()})
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


_EXPERT = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts\.)(\d+)\.(.+)$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.(weight|e_score_correction_bias)$")


def expected_tensors(source: dict, kept: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """The pruned checkpoint, computed independently of the pruner with torch indexing."""
    want = {}
    for name, (t, _) in source.items():
        if (m := _EXPERT.match(name)) and int(m[2]) in kept:
            ids = kept[int(m[2])]
            if int(m[3]) in ids:
                want[f"{m[1]}{ids.index(int(m[3]))}.{m[4]}"] = t
        elif (m := _ROUTER.match(name)) and int(m[1]) in kept:
            want[name] = t[kept[int(m[1])]]
        else:
            want[name] = t
    return want


def write_mask(path: Path, keep: dict[int, list[int]], spec=None) -> Path:
    mask = ExpertMask.for_spec(spec, keep, method="test") if spec else ExpertMask(
        {l: tuple(v) for l, v in keep.items()})
    mask.save(path)
    return path


def run_main(capsys, *argv) -> tuple[int, str]:
    rc = prune.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.easyep-tmp-*"))


WHOLE_GROUPS = {1: [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15], 2: [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]}


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    torch.manual_seed(0)
    root = write_checkpoint(tmp_path_factory.mktemp("ds") / "DeepSeek-V3-tiny", DEEPSEEK_CONFIG,
                            deepseek_tensors(DEEPSEEK_CONFIG), n_shards=4)
    return root, checksums(root)

