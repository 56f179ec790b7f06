"""DeepSeek-R1's FP8 release layout (demo_model --fp8) through SGLang's own FP8 code on this CPU.

SGLang's Fp8MoEMethod and FP8 weight loaders build and fill the layers; sglang_plugin/cpu_fp8.py stands in for the
AMX packing and the two AMX kernels alone. The references are independent of both: the checkpoint dequantized by
SGLang's `block_quant_dequant` (not checkpoint/fp8_blocks.py), run by transformers' own DeepSeek-V3 modules in float32.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import generate
from easyep_sglang.serving import calibrate
from easyep_sglang.serving.launch import prepare
from expert_distribution import record_expert_counts
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.core.stats import ExpertStats
from server_specs import MASKS
from test_calibration_oracle import TEXTS, agreement, samples_for, show, transformers_statistics

ROOT = Path(__file__).resolve().parents[1]
FP8_MODEL = "deepseek_v3_fp8/bf16"  # SGLang serves FP8 with bf16/fp16 activations only (model_loader/loader.py:268)
FP8_MASK = "deepseek_v3_fp8/varying"  # mask, --prune and offline serving of it: test_prune_serving.py
RTOL = 1e-5
PROMPTS = ["Q: 37+48=? A:", "def add(a, b):\n    return", "The license grants you"]

# Runs in its own process with the launcher's environment: argv = [launch_server arguments as JSON, inputs
# .safetensors (x [T, H], ids [T, k]), output .safetensors]. For each MoE layer of the model SGLang built, the
# recorder's expert outputs e [T, k, H] for those inputs, and the FP8 block size it found.
RECORDER_ON_SGLANG_LAYERS = r"""
import sys
sys.path.insert(0, "tests")
import torch
from safetensors.torch import load_file, save_file
from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
from sglang_worker import Worker
from easyep_sglang.sglang_plugin.stats_recorder import _expert_outputs, fp8_block_size

model = Worker(sys.argv[1]).load()
inputs = load_file(sys.argv[2])
out = {}
for name, module in model.named_modules():
    if isinstance(module, FusedMoE):
        layer = int(name.split(".")[2])  # model.layers.L.mlp.experts
        block = fp8_block_size(module)
        out[f"{layer}.e"] = _expert_outputs(module, inputs["x"], inputs["ids"], block)
        out[f"{layer}.block"] = torch.tensor(block or 0)
        out[f"{layer}.weight_dtype"] = torch.tensor(module.w13_weight.element_size())
save_file(out, sys.argv[3])
"""


def dequantized_copy(fp8_dir: Path, out: Path) -> Path:
    """The FP8 checkpoint with every block-quantized weight replaced by its float32 value (SGLang's
    block_quant_dequant) and the quantization_config dropped: what transformers loads as a plain model."""
    from sglang.srt.layers.quantization.fp8_utils import block_quant_dequant

    config = json.loads((fp8_dir / "config.json").read_text())
    block = config.pop("quantization_config")["weight_block_size"]
    tensors = load_file(fp8_dir / "model.safetensors")
    plain = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight_scale_inv"):
            continue
        scale = tensors.get(name.removesuffix("weight") + "weight_scale_inv")
        plain[name] = tensor.float() if scale is None else block_quant_dequant(tensor, scale, block, torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    for path in fp8_dir.iterdir():
        if path.name not in ("model.safetensors", "config.json"):
            (out / path.name).write_bytes(path.read_bytes())
    (out / "config.json").write_text(json.dumps(config))
    save_file(plain, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_the_fp8_checkpoint_has_r1s_layout(model_store):
    model = model_store.model(FP8_MODEL)
    config = json.loads((model / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    tensors = load_file(model / "model.safetensors")
    spec = spec_from_model_path(model)
    assert spec.mtp_layers == (3,)
    fp8 = {name for name, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    bf16_kept = ("mlp.gate.weight", "embed_tokens.weight", "lm_head.weight", "shared_head.head.weight", "eh_proj.weight")
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and name.endswith(".weight") and not name.endswith(bf16_kept):
            assert name in fp8, name
            scale = tensors[name.removesuffix("weight") + "weight_scale_inv"]
            assert scale.dtype == torch.float32 and list(scale.shape) == [-(-n // 128) for n in tensor.shape], name
        elif name not in fp8 and not name.endswith("weight_scale_inv"):
            assert tensor.dtype in (torch.bfloat16, torch.float32), name  # correction bias: float32, as released
    expert = tensors["model.layers.1.mlp.experts.0.gate_proj.weight"]
    assert expert.shape[0] % 128 == 0 and expert.shape[1] % 128 == 0, "expert blocks are whole"
    assert "model.layers.3.mlp.experts.0.down_proj.weight_scale_inv" in tensors, "the MTP layer is FP8 too"


def test_recorder_expert_outputs_on_sglangs_fp8_layers_match_transformers(model_store, tmp_path):
    """SGLang builds the FP8 model (Fp8MoEMethod, its FP8 loader); the recorder's e[i,t] on those FusedMoE layers
    equals transformers' expert modules on the dequantized checkpoint in float32, within RTOL. SGLang serves FP8
    with bf16 activations only; x is bf16, and both sides compute in float32 from it."""
    fp8 = model_store.model(FP8_MODEL)
    spec = spec_from_model_path(fp8)
    generator = torch.Generator().manual_seed(0)
    hidden = json.loads((fp8 / "config.json").read_text())["hidden_size"]
    x = torch.randn(40, hidden, generator=generator).to(torch.bfloat16)  # [T, H]
    ids = torch.stack([torch.randperm(spec.n_experts, generator=generator)[: spec.top_k] for _ in range(40)])  # [T, k]
    save_file({"x": x, "ids": ids.to(torch.int32)}, tmp_path / "inputs.safetensors")
    argv, env = prepare(["--model-path", str(fp8), "--device", "cpu", "--dtype", "bfloat16",
                         "--record-stats", str(tmp_path / "stats")])
    proc = subprocess.run([sys.executable, "-c", RECORDER_ON_SGLANG_LAYERS, json.dumps(argv),
                           str(tmp_path / "inputs.safetensors"), str(tmp_path / "e.safetensors")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = load_file(tmp_path / "e.safetensors")
    reference = AutoModelForCausalLM.from_pretrained(dequantized_copy(fp8, tmp_path / "dequantized"),
                                                     dtype=torch.float32).eval()
    one, x = torch.ones(len(x), 1), x.float()
    for layer in spec.moe_layers:
        assert recorded[f"{layer}.block"].item() == 128 and recorded[f"{layer}.weight_dtype"].item() == 1, "FP8 in SGLang"
        experts = reference.model.layers[layer].mlp.experts
        with torch.no_grad():
            want = torch.stack([experts(x, ids[:, j : j + 1].long(), one) for j in range(spec.top_k)], 1)  # [T, k, H]
        got = recorded[f"{layer}.e"]
        rel = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
        print(f"layer {layer}: max relative error of e over (token, expert) {rel:.2e}")
        assert rel <= RTOL, (layer, rel)


@pytest.mark.parametrize("name, tp_size", [(f"mask:{FP8_MASK}", 1), (f"tp2:{FP8_MASK}", 2)])
@pytest.mark.servers("{name}")
def test_fp8_masked_server_routes_around_the_mask_and_calibrates(servers, tmp_path, name, tp_size):
    """On the FP8 model under a mask, at TP=1 and TP=2: SGLang's own recorder counts no choice of a masked expert,
    and calibration through the server tracks transformers on the dequantized checkpoint in float32. SGLang's
    activations are bf16 here (and its CPU MLA requantizes kv_b_proj per tensor,
    models/deepseek_common/deepseek_weight_loader.py:710), so h and x differ from float32 ones at bf16 precision:
    the agreement is measured and printed, loosely bounded as for bf16 checkpoints (test_calibration_oracle.py),
    with the top-M sets required equal. The recorder's own FP8 arithmetic is held to RTOL above."""
    server = servers.use(name)
    spec = spec_from_model_path(server.model_path)
    keep = MASKS[FP8_MASK]
    counts = record_expert_counts(server.base_url, server.recorder_dir,
                                  lambda: [generate(server, p, 60, temperature=1.0) for p in PROMPTS])  # [L, E]
    for layer, kept in keep.items():
        pruned = sorted(set(range(spec.n_experts)) - set(kept))
        assert counts[layer, pruned].sum() == 0 and counts[layer, kept].sum() > 0
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "fp8.safetensors"  # end to end through the calibrate CLI
    prompts.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in TEXTS))
    calibrate.main(["--model-path", str(server.model_path), "--prompts", str(prompts), "--domain", "fp8", "--out",
                    str(out), "--use-responses", "--num-samples", str(len(TEXTS)), "--base-url", server.base_url,
                    "--stats-dir", str(server.stats_dir)])
    recorded, provenance = ExpertStats.load(out)
    assert (provenance["dtype"], provenance["expert_weights"], provenance["tp_size"]) == (
        "bfloat16", "float8_e4m3fn", tp_size)
    samples = samples_for(server.model_path)  # the same token ids
    reference = transformers_statistics(dequantized_copy(server.model_path, tmp_path / "dequantized"),
                                        [s.token_ids for s in samples], torch.float32, keep)
    report = agreement(recorded, reference)
    show(f"deepseek_v3 FP8 (bf16 activations) TP={tp_size} under a mask", report)
    assert recorded.tokens.tolist() == reference["tokens"].tolist()
    for layer, kept in keep.items():
        pruned = [i for i in range(spec.n_experts) if i not in kept]
        assert recorded.frequency[spec.moe_layers.index(layer), pruned].sum() == 0
    assert all(r["l1_rel"] < 0.1 and r["top_m_same"] == 1.0 for r in report.values()), report
