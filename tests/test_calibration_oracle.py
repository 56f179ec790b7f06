"""Statistics recorded inside SGLang agree with an independent reference built on HF transformers.

The reference runs transformers' own model classes on the same token ids and reads g (the router's
applied weights), x (the MoE input), h (the input of post_attention_layernorm), e (the experts module
called with one-hot weights) and r (the experts module called with the router's weights) from hooks.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ARCHS
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.core.stats import STATISTICS, ExpertStats
from easyep_sglang.serving import calibrate
from easyep_sglang.serving.calibrate import ServerClient, collect
from easyep_sglang.sglang_plugin.gate_mask import PRUNED_BIAS
from server_specs import MASKS, MODEL_ARGS

# (prompt, response) pairs; the tiny tokenizer makes one token per character, plus BOS.
TEXTS = [
    ("Q: What is 37 + 48? A:", " 37 + 48 = 85, so the answer is 85."),
    ("def add(a, b):\n", "    return a + b\n\nprint(add(2, 3))\n"),
    ("Q: What is 37 + 48? A:", " Add the tens: 30 + 40 = 70; add the ones: 7 + 8 = 15; 70 + 15 = 85."),
    ("The license grants you", " a non-exclusive, worldwide, royalty-free right to use, copy and modify the work."),
]
RTOL = 1e-5
TOP_M = (4, 8)


def samples_for(model_dir):
    records = [{"text": prompt, "response": response} for prompt, response in TEXTS]
    return calibrate.tokenize(records, AutoTokenizer.from_pretrained(model_dir), use_responses=True)


@torch.no_grad()
def transformers_statistics(model_dir, sequences, dtype, keep=None) -> dict[str, torch.Tensor]:
    """Float64 [L, E] sums of every statistic (and "tokens" [L]) from transformers' own modules; with `keep`
    ({layer: kept ids}, DeepSeek-V3), the other experts' correction bias is PRUNED_BIAS, as the plugin sets it."""
    spec = spec_from_model_path(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    for layer_id, kept in (keep or {}).items():
        bias = model.model.layers[layer_id].mlp.gate.e_score_correction_bias  # [E]
        bias[[i for i in range(spec.n_experts) if i not in kept]] = PRUNED_BIAS
    seen = {}

    def keep(key):
        return lambda module, args, *out: seen.__setitem__(key, out[0] if out else args[0])

    layers = [model.model.layers[layer_id] for layer_id in spec.moe_layers]
    for row, layer in enumerate(layers):
        layer.post_attention_layernorm.register_forward_pre_hook(keep((row, "h")))
        layer.mlp.register_forward_pre_hook(keep((row, "x")))
        layer.mlp.gate.register_forward_hook(keep((row, "gate")))
    sums = {name: torch.zeros(len(layers), spec.n_experts, dtype=torch.float64) for name in STATISTICS}
    for ids in sequences:
        model(torch.tensor([ids]))
        for row, layer in enumerate(layers):
            x, h = seen[row, "x"].reshape(len(ids), -1), seen[row, "h"].reshape(len(ids), -1).double()  # [T, H]
            _, g, topk_ids = seen[row, "gate"]  # [T, k] applied weights (DeepSeek: x routed_scaling_factor), ids
            one = torch.ones(len(ids), 1, dtype=x.dtype)
            e = torch.stack([layer.mlp.experts(x, topk_ids[:, j : j + 1], one) for j in range(spec.top_k)], 1)  # [T, k, H]
            r = layer.mlp.experts(x, topk_ids, g).double()  # [T, H]
            s = (1 - (h * (h + r)).sum(-1) / (h.norm(dim=-1) * (h + r).norm(dim=-1))).clamp(min=0)  # [T]
            g, norm = g.double(), e.double().norm(dim=-1)  # [T, k]
            values = {"frequency": torch.ones_like(g), "gate": g, "easy_ep": g * norm * s[:, None],
                      "gate_norm": g * norm, "gate_token": g * s[:, None]}
            for name, value in values.items():
                sums[name][row].index_add_(0, topk_ids.reshape(-1), value.reshape(-1))
    sums["tokens"] = torch.full((len(layers),), sum(map(len, sequences)), dtype=torch.int64)
    return sums


def top_m(scores: torch.Tensor, m: int) -> list[set[int]]:
    return [set(sorted(range(len(row)), key=lambda i: (-row[i].item(), i))[:m]) for row in scores]


def agreement(recorded: ExpertStats, reference: dict) -> dict:
    """Per statistic: max relative error over non-negligible sums, absolute error of the negligible ones,
    the worst layer's L1 error relative to its L1 mass, and the share of top-M sets (M in TOP_M) that agree."""
    report = {}
    for name in STATISTICS:
        got, want = getattr(recorded, name).cpu(), reference[name]  # [L, E]
        big = want.abs() > 1e-6 * want.abs().max()
        rel = ((got - want).abs() / want.abs().clamp(min=1e-300))[big].max().item()
        small = (got - want)[~big].abs().max().item() if (~big).any() else 0.0
        l1 = ((got - want).abs().sum(dim=1) / want.abs().sum(dim=1)).max().item()
        same = [a == b for m in TOP_M for a, b in zip(top_m(got, m), top_m(want, m))]
        report[name] = {"max_rel": rel, "negligible_abs": small, "l1_rel": l1, "top_m_same": sum(same) / len(same)}
    return report


def show(label: str, report: dict) -> None:
    print(f"\n{label}: " + json.dumps({k: {m: f"{v:.2e}" for m, v in r.items()} for k, r in report.items()}))


def assert_agree(recorded: ExpertStats, reference: dict, label: str) -> None:
    report = agreement(recorded, reference)
    show(label, report)
    assert recorded.tokens.tolist() == reference["tokens"].tolist()
    assert torch.equal(recorded.frequency.cpu(), reference["frequency"])
    for name, r in report.items():
        assert r["max_rel"] <= RTOL and r["negligible_abs"] <= 1e-9, (name, r)
        assert r["top_m_same"] == 1.0, (name, r)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.servers("plain:{arch}/fp32")
def test_fp32_statistics_match_transformers(servers, arch):
    server = servers.use(f"plain:{arch}/fp32")
    samples = samples_for(server.model_path)
    recorded, provenance = collect(ServerClient(server.base_url), server.stats_dir, samples, progress=False)
    assert provenance["dtype"] == "float32" and provenance["tp_size"] == 1
    reference = transformers_statistics(server.model_path, [s.token_ids for s in samples], torch.float32)
    assert_agree(recorded, reference, f"{arch} fp32 TP=1 {' '.join(MODEL_ARGS[arch])}")


@pytest.mark.parametrize("server_name, tp_size", [
    ("tp2:deepseek_v3/tp2", 2),  # also test_gate_mask_parallel's server
    ("nodes2:deepseek_v3/tp2", 2),  # TP=2 across two nodes on loopback, also test_gate_mask_parallel's
    ("mask:deepseek_v3/varying+fusion", 1),  # the shared expert fused into the routed experts, SGLang's GPU default
])
@pytest.mark.servers("{server_name}")
def test_statistics_under_a_mask_match_transformers(servers, server_name, tp_size):
    server = servers.use(server_name)
    samples = samples_for(server.model_path)
    dumps = len(list(server.stats_dir.glob(calibrate.DUMP_GLOB)))
    recorded, provenance = collect(ServerClient(server.base_url), server.stats_dir, samples, progress=False)
    assert provenance["tp_size"] == tp_size
    assert len(list(server.stats_dir.glob(calibrate.DUMP_GLOB))) == dumps + 1, "TP rank 0 alone writes"
    keep = MASKS[server_name.split(":")[1].removesuffix("+fusion")]
    reference = transformers_statistics(server.model_path, [s.token_ids for s in samples], torch.float32, keep)
    spec = spec_from_model_path(server.model_path)
    for layer, kept in keep.items():
        pruned = [i for i in range(spec.n_experts) if i not in kept]
        assert reference["frequency"][spec.moe_layers.index(layer), pruned].sum() == 0, "the reference routes around the mask"
    assert_agree(recorded, reference, f"deepseek_v3 fp32 {server_name}")


def test_calibrate_cli_bf16_agreement(tiny_models, tmp_path):
    """The CLI end to end, starting its own server; bf16 agreement is measured and printed, loosely bounded.
    (The README's Qwen3-MoE bf16 figures came from this test parametrized over both architectures, at bf6e079.)"""
    model = tiny_models["deepseek_v3"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in TEXTS))
    out = tmp_path / "stats.safetensors"
    calibrate.main(["--model-path", str(model), "--prompts", str(prompts), "--domain", "demo", "--out", str(out),
                    "--use-responses", "--num-samples", str(len(TEXTS))])
    recorded, provenance = ExpertStats.load(out)
    assert provenance["domain"] == "demo" and provenance["samples"] == len(TEXTS) and provenance["dtype"] == "bfloat16"
    reference = transformers_statistics(model, [s.token_ids for s in samples_for(model)], torch.bfloat16)
    report = agreement(recorded, reference)
    show("deepseek_v3 bf16 TP=1", report)
    assert recorded.tokens.tolist() == reference["tokens"].tolist()
    assert all(r["l1_rel"] < 0.1 for r in report.values()), report  # bf16 attention noise moves h and some choices


ENGINE_SCRIPT = """
import json, sys
from easyep_sglang.serving.calibrate import Sample, collect
from easyep_sglang.serving.engine import EngineClient, create_engine

if __name__ == "__main__":
    model, stats_dir, sequences = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    engine = create_engine(model, record_stats_dir=stats_dir, dtype="float32", log_level="error")
    try:
        stats, provenance = collect(EngineClient(engine), stats_dir, [Sample(tuple(s)) for s in sequences], progress=False)
        stats.save(sys.argv[4], provenance)
    finally:
        engine.shutdown()
"""


def test_engine_statistics_match_transformers(tiny_models_fp32, tmp_path):
    model = tiny_models_fp32["qwen3_moe"]
    sequences = [s.token_ids for s in samples_for(model)]
    script, out = tmp_path / "engine_calibrate.py", tmp_path / "engine.safetensors"
    script.write_text(ENGINE_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(model), str(tmp_path / "stats"), json.dumps(sequences),
                             str(out)], capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    recorded, _ = ExpertStats.load(out)
    assert_agree(recorded, transformers_statistics(model, sequences, torch.float32), "qwen3_moe fp32 Engine")
