"""Tiny, randomly initialised MoE checkpoints with a tokenizer, built offline for tests and demos.

    python -m easyep_sglang.demo_model --arch deepseek_v3 --out /tmp/tiny-dsv3 [--mtp-layers 1]

The models come from transformers' own config and model classes, so the checkpoint layout
(`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`) and config.json are what a real
Hugging Face release of that architecture looks like, only small. Routers are re-drawn with a
larger spread than the default init so that routing is decisive and uneven across experts.

DeepSeek-V3 can carry next-n (MTP) layers, `model.layers.{num_hidden_layers + i}`, laid out as in
DeepSeek's release (transformers builds none; SGLang loads them as the NEXTN speculative draft). They are
drawn from their own seed after the main model, so its tensors are those of the build without them.

`--fp8` writes DeepSeek-V3 as R1 is released: every linear weight block-quantized to float8_e4m3fn with a
`weight_scale_inv` per 128x128 block (checkpoint/fp8_blocks.py), except the routers, the embeddings, the heads and the MTP
layer's eh_proj, which stay bf16 like the norms; its widths give whole blocks on each of two TP ranks (FP8_DIMS).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, processors
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from easyep_sglang import __version__
from easyep_sglang.checkpoint import fp8_blocks
from easyep_sglang.core.fileio import publish_directory

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHARACTERS = tuple(chr(c) for c in range(32, 127)) + ("\n",)  # printable ASCII + newline, one token each
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORRECTION_BIAS_STD = 0.1  # DeepSeek-V3 e_score_correction_bias; zero would hide bias-handling bugs
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# R1's release keeps these 2-D weights in bf16; every other 2-D weight is FP8 with block scales
FP8_KEPT_BF16 = ("mlp.gate.weight", "embed_tokens.weight", "lm_head.weight", "shared_head.head.weight", "eh_proj.weight")
# Every matrix SGLang splits over TP=2, or fuses, holds whole 128-wide blocks per rank, as SGLang's FP8 loader requires
# (layers/quantization/fp8.py, the block checks of create_weights): q/kv heads 4 x (64 + 64), v 4 x 64, experts 256.
FP8_DIMS = {"q_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 64,
            "moe_intermediate_size": 2 * fp8_blocks.BLOCK}

# DeepSeek-V3's YaRN, written as transformers 5 writes it (`rope_parameters`, the old `rope_scaling`).
# SGLang reads the same dict and renames it "deepseek_yarn", the only rope its CPU path supports.
DEEPSEEK_YARN = {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024,
    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
}


@dataclass(frozen=True)
class DemoArch:
    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    dims: dict
    # The default init (std 0.02) routes almost uniformly. Router logits are ~ N(0, std^2 * hidden_size).
    router_weight_std: float
    config_json_renames: dict = field(default_factory=dict)  # transformers' key -> the key real checkpoints use
    mtp: bool = False  # can carry next-n (MTP) layers (config key num_nextn_predict_layers)


SUPPORTED_ARCHS: dict[str, DemoArch] = {
    "deepseek_v3": DemoArch(
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=3, first_k_dense_replace=1, moe_layer_freq=1,
            num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
            n_routed_experts=16, n_shared_experts=1, moe_intermediate_size=64, num_experts_per_tok=4,
            n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid",
            norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=0,
            max_position_embeddings=4096, rope_parameters=DEEPSEEK_YARN, tie_word_embeddings=False,
        ),
        router_weight_std=0.2,  # logit std ~2.3: sigmoid scores mostly unsaturated, so applied weights still differ
        mtp=True,
    ),
    "qwen3_moe": DemoArch(
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=3, decoder_sparse_step=1, mlp_only_layers=[],
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            num_experts=16, moe_intermediate_size=64, num_experts_per_tok=4, norm_topk_prob=True,
            max_position_embeddings=4096, tie_word_embeddings=False,
        ),
        router_weight_std=0.5,  # logit std ~5.7: the softmax puts most weight on the first choice
        # SGLang's qwen3_moe.py reads config.num_experts, as Qwen's own config.json files spell it.
        config_json_renames={"num_local_experts": "num_experts"},
    ),
}


def create_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: every printable ASCII character (digits included) is one token."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE without merges over the unsplit text yields exactly one token per known character.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def create_model(arch: DemoArch, vocab_size: int, seed: int, dtype: torch.dtype, overrides: dict) -> PreTrainedModel:
    config = arch.config_class(
        **copy.deepcopy({**arch.dims, **overrides}),  # configs keep (and may edit) the dicts they are given
        vocab_size=vocab_size, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    with torch.random.fork_rng(devices=[]):  # deterministic without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = arch.model_class(config)  # initialised in float32, so a bf16 build rounds the fp32 one
        for name, module in model.named_modules():
            if not name.endswith("mlp.gate"):
                continue
            torch.nn.init.normal_(module.weight, std=arch.router_weight_std)  # [E, H]
            if hasattr(module, "e_score_correction_bias"):
                torch.nn.init.normal_(module.e_score_correction_bias, std=CORRECTION_BIAS_STD)  # [E]
    # DeepSeek's release keeps e_score_correction_bias in fp32 whatever the weight dtype.
    fp32_biases = [(m, m.e_score_correction_bias) for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    model.to(dtype)
    for module, bias in fp32_biases:
        module.e_score_correction_bias = bias
    return model.eval()


def _mtp_tensors(arch: DemoArch, vocab_size: int, seed: int, dtype: torch.dtype, overrides: dict,
                 main: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The next-n (MTP) layers as DeepSeek-V3's release lays them out: layer N+i is a MoE decoder layer
    (here: layer N+i of a deeper model drawn from seed + 1) plus enorm, hnorm, eh_proj and shared_head,
    with embed_tokens and shared_head.head copies of the main model's."""
    n_main = overrides.get("num_hidden_layers", arch.dims["num_hidden_layers"])
    n_mtp = overrides["num_nextn_predict_layers"]
    deeper = {**overrides, "num_hidden_layers": n_main + n_mtp, "num_nextn_predict_layers": 0}
    donor = create_model(arch, vocab_size, seed + 1, dtype, deeper)
    with tempfile.TemporaryDirectory() as tmp:
        donor.save_pretrained(tmp)  # checkpoint names (per-expert tensors), as the main model's
        layers = load_file(Path(tmp) / "model.safetensors")
    hidden = donor.config.hidden_size
    generator = torch.Generator().manual_seed(seed + 1)
    out = {}
    for layer in range(n_main, n_main + n_mtp):
        prefix = f"model.layers.{layer}."
        out.update({name: t for name, t in layers.items() if name.startswith(prefix)})
        eh_proj = torch.randn(hidden, 2 * hidden, generator=generator) * (2 * hidden) ** -0.5  # [H, 2H]
        out.update({
            prefix + "enorm.weight": torch.ones(hidden, dtype=dtype),
            prefix + "hnorm.weight": torch.ones(hidden, dtype=dtype),
            prefix + "eh_proj.weight": eh_proj.to(dtype),
            prefix + "shared_head.norm.weight": torch.ones(hidden, dtype=dtype),
            prefix + "shared_head.head.weight": main["lm_head.weight"].clone(),
            prefix + "embed_tokens.weight": main["model.embed_tokens.weight"].clone(),
        })
    return out


def _add_mtp_layers(directory: Path, arch: DemoArch, vocab_size: int, seed: int, dtype: torch.dtype,
                    overrides: dict) -> None:
    path = directory / "model.safetensors"
    assert path.is_file() and not (directory / "model.safetensors.index.json").exists(), "tiny models are one shard"
    main = load_file(path)
    save_file({**main, **_mtp_tensors(arch, vocab_size, seed, dtype, overrides, main)}, path, metadata={"format": "pt"})


def _quantize_fp8(directory: Path) -> None:
    """Block-quantize the checkpoint's linear weights in place, as DeepSeek's FP8 release does."""
    path = directory / "model.safetensors"
    tensors = {}
    for name, tensor in load_file(path).items():
        if tensor.dim() == 2 and name.endswith(".weight") and not name.endswith(FP8_KEPT_BF16):
            tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = fp8_blocks.quantize(tensor)
        else:
            tensors[name] = tensor
    save_file(tensors, path, metadata={"format": "pt"})


def _write_checkpoint(directory: Path, arch_name: str, seed: int, dtype: str, overrides: dict,
                      fp8: bool = False) -> None:
    arch = SUPPORTED_ARCHS[arch_name]
    tokenizer = create_tokenizer()
    model = create_model(arch, len(tokenizer), seed, DTYPES[dtype], overrides)
    model.save_pretrained(directory)
    if overrides.get("num_nextn_predict_layers"):
        _add_mtp_layers(directory, arch, len(tokenizer), seed, DTYPES[dtype], overrides)
    if fp8:
        _quantize_fp8(directory)
    tokenizer.save_pretrained(directory, save_jinja_files=False)  # chat_template inside tokenizer_config.json
    if arch.config_json_renames or fp8:
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text())
        for old_key, new_key in arch.config_json_renames.items():
            config[new_key] = config.pop(old_key)
        if fp8:
            config["quantization_config"] = fp8_blocks.QUANTIZATION_CONFIG
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    provenance = {
        "builder": "easyep_sglang.demo_model", "arch": arch_name, "seed": seed, "dtype": dtype, "fp8": fp8,
        "overrides": overrides, "easyep_sglang_version": __version__,
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
    }
    (directory / "easyep_build.json").write_text(json.dumps(provenance, indent=2) + "\n")


def build_tiny_model(
    arch: str, out_dir: str | Path, seed: int = 0, dtype: str = "bfloat16", force: bool = False, fp8: bool = False,
    **overrides
) -> Path:
    """Build a tiny `arch` checkpoint in `out_dir`; `overrides` replace config fields (e.g. num_hidden_layers=2).
    fp8: DeepSeek-V3 block-quantized as R1 is released (bf16 where R1 keeps bf16)."""
    if fp8 and arch != "deepseek_v3":
        raise ValueError(f"--fp8 builds DeepSeek-V3 in R1's FP8 layout; {arch} has no FP8 release layout here")
    if fp8:
        dtype, overrides = "bfloat16", {**FP8_DIMS, **overrides}
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHS))}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    if overrides.get("num_nextn_predict_layers") and not SUPPORTED_ARCHS[arch].mtp:
        mtp_archs = ", ".join(sorted(name for name, a in SUPPORTED_ARCHS.items() if a.mtp))
        raise ValueError(f"{arch} has no next-n (MTP) layers; build one of {mtp_archs}, or drop --mtp-layers")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} is not empty; pass --force to replace it")
    with publish_directory(out_dir) as staging:
        _write_checkpoint(staging, arch, seed, dtype, overrides, fp8)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m easyep_sglang.demo_model",
        description="Build a tiny, randomly initialised MoE checkpoint with a character-level tokenizer, offline. "
        "Same arch, seed and dtype give a byte-identical model.safetensors.",
    )
    parser.add_argument("--arch", required=True, choices=sorted(SUPPORTED_ARCHS), help="model architecture")
    parser.add_argument("--out", required=True, type=Path, help="output directory (must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for all weights (default: 0)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="weight dtype (default: bfloat16)")
    parser.add_argument("--force", action="store_true", help="replace --out if it is not empty")
    parser.add_argument("--mtp-layers", type=int, default=0, metavar="N",
                        help="next-n (MTP) layers after the main ones, for SGLang's NEXTN speculative decoding "
                        "(deepseek_v3; SGLang loads 1) (default: 0)")
    parser.add_argument("--fp8", action="store_true",
                        help="deepseek_v3 as DeepSeek-R1 is released: linear weights in float8_e4m3fn with a "
                        "weight_scale_inv per 128x128 block; routers, embeddings, heads and eh_proj in bf16 (implies "
                        "--dtype bfloat16 and widths that split into whole blocks over TP=2)")
    args = parser.parse_args(argv)
    mtp = {"num_nextn_predict_layers": args.mtp_layers} if args.mtp_layers else {}
    try:
        out_dir = build_tiny_model(args.arch, args.out, seed=args.seed, dtype=args.dtype, force=args.force,
                                   fp8=args.fp8, **mtp)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    print(f"easyep: built tiny {args.arch} ({'fp8' if args.fp8 else args.dtype}, seed {args.seed}) in {out_dir}")
