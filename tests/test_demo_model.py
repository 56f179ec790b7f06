"""Tiny demo checkpoints: build offline, deterministic, loadable by stock transformers, readable by MoESpec."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from easyep_sglang.core.spec import ROUTER_SIGMOID_BIAS, ROUTER_SOFTMAX, spec_from_model_path
from easyep_sglang.demo.tiny_models import SUPPORTED_ARCHS, build_tiny_model, main

ARCHS = sorted(SUPPORTED_ARCHS)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHS}


def read_tensor(model_dir, name):
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return f.get_tensor(name)


@pytest.mark.parametrize("arch", ARCHS)
def test_build_writes_a_complete_checkpoint(built, arch):
    files = {p.name for p in built[arch].iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "easyep_build.json"} <= files
    provenance = json.loads((built[arch] / "easyep_build.json").read_text())
    assert provenance["builder"] == "easyep_sglang.demo_model"
    assert (provenance["arch"], provenance["seed"], provenance["dtype"]) == (arch, 0, "bfloat16")
    config = json.loads((built[arch] / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)


def test_same_seed_gives_identical_bytes(tmp_path):
    first = build_tiny_model("deepseek_v3", tmp_path / "a", seed=3)
    second = build_tiny_model("deepseek_v3", tmp_path / "b", seed=3)
    other_seed = build_tiny_model("deepseek_v3", tmp_path / "c", seed=4)
    weights = lambda d: (d / "model.safetensors").read_bytes()
    assert weights(first) == weights(second)
    assert weights(first) != weights(other_seed)


def test_bfloat16_build_rounds_the_float32_build(built, tmp_path):
    fp32_dir = build_tiny_model("qwen3_moe", tmp_path / "fp32", dtype="float32")
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    fp32, bf16 = read_tensor(fp32_dir, name), read_tensor(built["qwen3_moe"], name)
    assert (fp32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16)
    assert torch.equal(fp32.to(torch.bfloat16), bf16)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_every_weight_and_runs(built, arch):
    model, info = AutoModelForCausalLM.from_pretrained(built[arch], output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokenizer = AutoTokenizer.from_pretrained(built[arch])
    input_ids = tokenizer("Q: 37+48=? A:", return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        logits = model(input_ids).logits  # [1, T, V]
    assert logits.shape == (1, input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_tokenizer_round_trips_and_has_a_chat_template(built):
    tokenizer = AutoTokenizer.from_pretrained(built["deepseek_v3"])
    text = "Q: 37+48=? A: 85"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + len(text)  # one token per character, digits too
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><|user|>\nhi\n<|assistant|>\n"
    assert "chat_template" in json.loads((built["deepseek_v3"] / "tokenizer_config.json").read_text())


def test_spec_reads_deepseek_v3(built):
    spec = spec_from_model_path(built["deepseek_v3"])
    assert spec.moe_layers == (1, 2) and spec.mtp_layers == ()
    assert (spec.n_experts, spec.top_k, spec.n_group, spec.topk_group) == (16, 4, 4, 2)
    assert spec.router == ROUTER_SIGMOID_BIAS and spec.n_shared_experts == 1


def test_spec_reads_qwen3_moe(built):
    spec = spec_from_model_path(built["qwen3_moe"])
    assert spec.moe_layers == (0, 1, 2)
    assert (spec.n_experts, spec.top_k, spec.n_group) == (16, 4, 1)
    assert spec.router == ROUTER_SOFTMAX and spec.experts_config_key == "num_experts"


def test_config_json_uses_the_keys_sglang_reads(built):
    deepseek = json.loads((built["deepseek_v3"] / "config.json").read_text())
    assert deepseek["rope_parameters"]["rope_type"] == "yarn"  # SGLang renames it deepseek_yarn
    assert deepseek["num_nextn_predict_layers"] == 0
    qwen = json.loads((built["qwen3_moe"] / "config.json").read_text())
    assert qwen["num_experts"] == 16 and "num_local_experts" not in qwen


def test_deepseek_correction_bias_is_nonzero_fp32(built):
    bias = read_tensor(built["deepseek_v3"], "model.layers.1.mlp.gate.e_score_correction_bias")  # [E]
    assert bias.dtype == torch.float32 and bias.shape == (16,)
    assert bias.abs().min() > 0 and bias.std() > 0.05


def test_unknown_arch_lists_supported(tmp_path):
    with pytest.raises(ValueError, match="deepseek_v3, qwen3_moe"):
        build_tiny_model("mixtral", tmp_path / "m")


def test_existing_dir_needs_force(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--force"):
        build_tiny_model("qwen3_moe", out, num_hidden_layers=1)
    with pytest.raises(SystemExit):
        main(["--arch", "qwen3_moe", "--out", str(out)])
    assert (out / "keep.txt").read_text() == "precious"
    main(["--arch", "qwen3_moe", "--out", str(out), "--force"])
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left behind
