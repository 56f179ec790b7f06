"""Offline pruner on synthetic checkpoints with DeepSeek-V3's and Qwen3-MoE's real tensor layouts (CPU only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from easyep_sglang.checkpoint import prune
from easyep_sglang.checkpoint import pruned_checkpoint
from easyep_sglang.checkpoint import safetensors_stream
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.spec import spec_from_config
from synthetic_checkpoints import (DEEPSEEK_CONFIG, EXTRA_FILES, WHOLE_GROUPS, E, H, I_DENSE, I_MOE, V, checksums,
                                   deepseek, expected_tensors, load_all, run_main, same_bytes, write_checkpoint,
                                   write_mask)


TWO_PER_GROUP = [0, 1, 4, 5, 8, 9, 12, 13]
# The MTP layer (3) keeps all 16 experts unless the mask names it, so the checkpoint is then plugin-only.
DEEPSEEK_CASES = {  # mask -> (n_routed_experts, n_group, topk_group, stock_engine)
    "uniform-split-groups": ({1: [0, 1, 2, 4, 5, 6, 8, 12], 2: [1, 3, 5, 7, 9, 11, 13, 15]}, (E, 1, 1, "plugin-only")),
    "per-layer-counts": ({1: list(range(8)), 2: list(range(12))}, (E, 1, 1, "plugin-only")),
    "whole-groups": (WHOLE_GROUPS, (E, 1, 1, "plugin-only")),
    "two-per-group": ({1: TWO_PER_GROUP, 2: [2, 3, 6, 7, 10, 11, 14, 15], 3: TWO_PER_GROUP}, (8, 4, 2, "exact")),
    "mtp-too": ({**WHOLE_GROUPS, 3: [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]}, (12, 3, 2, "exact")),
}


@pytest.mark.parametrize("case", list(DEEPSEEK_CASES))
def test_prune_deepseek_fp8(deepseek, tmp_path, capsys, case):
    src, before = deepseek
    keep, (n_experts, n_group, topk_group, stock) = DEEPSEEK_CASES[case]
    spec = spec_from_config(DEEPSEEK_CONFIG)
    mask = write_mask(tmp_path / "mask.json", keep, spec)
    out = tmp_path / "pruned"
    rc, err = run_main(capsys, "--model-path", src, "--mask", mask, "--out", out, "--verify-bytes", "1000")
    assert rc == 0, err

    source, pruned = load_all(src), load_all(out)
    want = expected_tensors(source, keep)
    assert set(pruned) == set(want)  # removed experts are absent, nothing else is
    assert all(same_bytes(pruned[n][0], want[n]) for n in want)
    if 3 not in keep:  # the MTP layer is intact unless the mask names it
        assert all(same_bytes(pruned[n][0], t) for n, (t, _) in source.items() if n.startswith("model.layers.3."))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {n: f for n, (_, f) in pruned.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t, _ in pruned.values())
    assert {p.name for p in out.glob("*.safetensors")} == set(index["weight_map"].values())

    config = json.loads((out / "config.json").read_text())
    assert (config["n_routed_experts"], config["n_group"], config["topk_group"]) == (n_experts, n_group, topk_group)
    assert {k: v for k, v in config.items() if k not in ("n_routed_experts", "n_group", "topk_group", "easyep")} \
        == {k: v for k, v in DEEPSEEK_CONFIG.items() if k not in ("n_routed_experts", "n_group", "topk_group")}
    block = config["easyep"]
    assert block["stock_engine"] == stock and block["source_n_experts"] == E and block["source_n_group"] == 4
    assert block["per_layer_experts"] == {str(l): len(keep.get(l, range(E))) for l in (1, 2, 3)}
    assert block["kept"] == {str(l): sorted(ids) for l, ids in keep.items()}
    assert block["mask_digest"] == ExpertMask.load(mask).digest()

    provenance = json.loads((out / "easyep_prune.json").read_text())
    assert provenance["kept"] == {str(l): ids for l, ids in keep.items()}
    assert provenance["source"]["path"] == str(src) and provenance["source"]["fingerprint"] == spec.fingerprint
    assert provenance["mask"]["digest"] == block["mask_digest"] and provenance["mask"]["method"] == "test"
    for rel, text in EXTRA_FILES.items():
        assert (out / rel).read_text() == text
    assert checksums(src) == before
    assert not list(tmp_path.glob(".pruned.easyep-tmp-*"))


QWEN_CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H,
               "intermediate_size": I_DENSE, "moe_intermediate_size": I_MOE, "vocab_size": V, "num_hidden_layers": 2,
               "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
               "norm_topk_prob": True}


def test_prune_qwen3_single_file(tmp_path, capsys):
    torch.manual_seed(1)
    bf16 = lambda *shape: torch.randn(*shape).to(torch.bfloat16)  # noqa: E731
    tensors = {"model.embed_tokens.weight": bf16(V, H), "lm_head.weight": bf16(V, H)}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        tensors[f"{p}.gate.weight"] = bf16(8, H)
        for e in range(8):
            tensors.update({f"{p}.experts.{e}.gate_proj.weight": bf16(I_MOE, H),
                            f"{p}.experts.{e}.up_proj.weight": bf16(I_MOE, H),
                            f"{p}.experts.{e}.down_proj.weight": bf16(H, I_MOE)})
    src = write_checkpoint(tmp_path / "qwen", QWEN_CONFIG, tensors, n_shards=1)
    (src / "pytorch_model.bin").write_bytes(b"unpruned weights in another format")
    before = checksums(src)
    keep = {0: [0, 2, 5, 7], 1: [1, 2, 3, 4]}
    mask = write_mask(tmp_path / "mask.json", keep, spec_from_config(QWEN_CONFIG))
    out = tmp_path / "pruned"
    rc, err = run_main(capsys, "--model-path", src, "--mask", mask, "--out", out)
    assert rc == 0, err
    assert "not copied" in err and "pytorch_model.bin" in err
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        ["config.json", "easyep_prune.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json"])
    pruned, want = load_all(out), expected_tensors(load_all(src), keep)
    assert set(pruned) == set(want) and all(same_bytes(pruned[n][0], want[n]) for n in want)
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 4 and config["easyep"]["stock_engine"] == "exact"
    assert "n_group" not in config
    assert checksums(src) == before


# ---- planning units --------------------------------------------------------------------------------------
def test_router_rows_merge_into_ranges():
    info = safetensors_stream.TensorInfo("BF16", (8, 4), 100, 164)
    assert info.row_ranges((0, 1, 2, 5, 7)) == ((100, 24), (140, 8), (156, 8))
    t = prune.plan_tensor("model.layers.3.mlp.gate.weight", info, {3: (0, 1, 2, 5, 7)}, 8)
    assert t.shape == (5, 4) and t.nbytes == 40
    expert = safetensors_stream.TensorInfo("F8_E4M3", (2, 2), 0, 4)
    name = "model.layers.3.mlp.experts.5.down_proj.weight_scale_inv"
    assert prune.plan_tensor(name, expert, {3: (0, 1, 2, 5, 7)}, 8).name == name.replace(".5.", ".3.")
    assert prune.plan_tensor(name, expert, {3: (0, 1, 2, 7)}, 8) is None
    assert prune.plan_tensor(name, expert, {4: (0,)}, 8).name == name


def test_stock_routing_rules():
    v3 = spec_from_config({**DEEPSEEK_CONFIG, "num_nextn_predict_layers": 0})  # sigmoid: a group's score is its top-2 sum
    one_per_group = {1: [0, 4, 8, 12], 2: [1, 5, 9, 13]}
    assert pruned_checkpoint.stock_routing(v3, one_per_group) == (4, 1, 1, "approximate")
    assert pruned_checkpoint.stock_routing(v3, {}) == (E, 4, 2, "exact")
    v2 = spec_from_config({**DEEPSEEK_CONFIG, "architectures": ["DeepseekV2ForCausalLM"], "num_experts_per_tok": 2,
                           "topk_method": "group_limited_greedy", "scoring_func": "softmax",
                           "num_nextn_predict_layers": 0})
    assert pruned_checkpoint.stock_routing(v2, one_per_group) == (4, 4, 2, "exact")  # softmax: a group's score is its max
    assert pruned_checkpoint.stock_routing(v2, {1: [0, 4, 8, 12]}) == (E, 1, 1, "plugin-only")


# ---- stock transformers loads the pruned model and matches the masked original ----------------------------
def _random_init(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 1.0 if name.endswith("gate.weight") else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if "norm" in name else 0.0))


def _load_pruned(out: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_transformers_deepseek_v3_whole_groups_exact(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(vocab_size=V, hidden_size=H, intermediate_size=I_DENSE, moe_intermediate_size=I_MOE,
                              num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16, n_group=8,
                              topk_group=2, num_experts_per_tok=4, n_shared_experts=1, num_attention_heads=4,
                              num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                              qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=64,
                              num_nextn_predict_layers=0)
    model = DeepseekV3ForCausalLM(config)
    _random_init(model, 0)
    for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.1)
    src, out = tmp_path / "orig", tmp_path / "pruned"
    model.to(torch.bfloat16).save_pretrained(src)
    saved = json.loads((src / "config.json").read_text())  # transformers 5 drops these; real V3 configs have them
    (src / "config.json").write_text(json.dumps({**saved, "topk_method": "noaux_tc", "scoring_func": "sigmoid"}))
    keep = {1: [0, 1, 4, 5, 10, 11, 14, 15], 2: [2, 3, 4, 5, 6, 7, 12, 13]}  # 4 whole groups of 2 per layer
    mask = write_mask(tmp_path / "mask.json", keep, spec_from_config(json.loads((src / "config.json").read_text())))
    rc, err = run_main(capsys, "--model-path", src, "--mask", mask, "--out", out)
    assert rc == 0, err
    pruned_config = json.loads((out / "config.json").read_text())
    assert (pruned_config["n_routed_experts"], pruned_config["n_group"], pruned_config["topk_group"]) == (8, 4, 2)

    masked = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for layer, ids in keep.items():  # the soft mask the plugin serves: pruned experts get bias -1e4
        bias = masked.model.layers[layer].mlp.gate.e_score_correction_bias
        bias[[e for e in range(16) if e not in ids]] = -1e4
    pruned = _load_pruned(out)
    input_ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = masked(input_ids).logits, pruned(input_ids).logits
        unmasked = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(input_ids).logits
    assert not torch.allclose(unmasked, want, atol=1e-3)  # the mask changes routing, so the check has teeth
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_transformers_qwen3_moe_exact(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=V, hidden_size=H, intermediate_size=I_DENSE, moe_intermediate_size=I_MOE,
                            num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, norm_topk_prob=True)
    model = Qwen3MoeForCausalLM(config)
    _random_init(model, 1)
    src, out = tmp_path / "orig", tmp_path / "pruned"
    model.to(torch.bfloat16).save_pretrained(src)
    keep = {0: [0, 2, 5, 7], 1: [1, 2, 3, 6]}
    mask = write_mask(tmp_path / "mask.json", keep, spec_from_config(json.loads((src / "config.json").read_text())))
    rc, err = run_main(capsys, "--model-path", src, "--mask", mask, "--out", out)
    assert rc == 0, err

    masked = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for layer, ids in keep.items():  # the soft mask: pruned router logits forced to -inf before top-k
        pruned_ids = [e for e in range(8) if e not in ids]

        def route_masked(gate, inputs, output, pruned_ids=pruned_ids):
            logits = torch.nn.functional.linear(inputs[0].reshape(-1, gate.hidden_dim), gate.weight)  # [T, E]
            logits[:, pruned_ids] = float("-inf")
            top, idx = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), gate.top_k, dim=-1)
            top = top / top.sum(dim=-1, keepdim=True) if gate.norm_topk_prob else top
            return logits, top.to(logits.dtype), idx

        masked.model.layers[layer].mlp.gate.register_forward_hook(route_masked)
    pruned = _load_pruned(out)
    input_ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids).logits, masked(input_ids).logits, atol=1e-5, rtol=0)
