"""MoESpec from config.json for every supported family; mask format 1, validation and reference import."""

import json

import pytest

from easyep_sglang.core.mask import ExpertMask, MaskError, main as mask_main
from easyep_sglang.core.spec import ROUTER_SIGMOID_BIAS, ROUTER_SOFTMAX, spec_from_config

DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 5, "hidden_size": 64, "vocab_size": 100,
    "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 16, "num_experts_per_tok": 4,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "n_shared_experts": 1, "num_nextn_predict_layers": 1,
}
DEEPSEEK_V2 = {
    **DEEPSEEK_V3, "architectures": ["DeepseekV2ForCausalLM"], "topk_method": "group_limited_greedy",
    "scoring_func": "softmax", "num_nextn_predict_layers": 0, "n_shared_experts": 2,
}
QWEN3 = {
    "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 100,
    "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
    "decoder_sparse_step": 1, "mlp_only_layers": [0],
}
QWEN2 = {**QWEN3, "architectures": ["Qwen2MoeForCausalLM"], "mlp_only_layers": [],
         "decoder_sparse_step": 2, "shared_expert_intermediate_size": 64}


def test_spec_deepseek_v3():
    spec = spec_from_config(DEEPSEEK_V3)
    assert spec.moe_layers == (1, 2, 3, 4) and spec.mtp_layers == (5,)
    assert (spec.n_experts, spec.top_k, spec.n_group, spec.topk_group) == (16, 4, 4, 2)
    assert spec.router == ROUTER_SIGMOID_BIAS and spec.n_shared_experts == 1
    assert spec.group_size == 4 and spec.group_of(7) == 1


def test_spec_deepseek_v2_and_qwen():
    v2 = spec_from_config(DEEPSEEK_V2)
    assert v2.router == ROUTER_SOFTMAX and v2.n_group == 4 and v2.mtp_layers == ()
    q3 = spec_from_config(QWEN3)
    assert q3.moe_layers == (1, 2, 3) and q3.n_group == 1 and q3.router == ROUTER_SOFTMAX
    assert q3.experts_config_key == "num_experts" and q3.n_shared_experts == 0
    q2 = spec_from_config(QWEN2)
    assert q2.moe_layers == (1, 3) and q2.n_shared_experts == 1
    legacy = {k: v for k, v in QWEN3.items() if k != "num_experts"} | {"num_local_experts": 8}
    assert spec_from_config(legacy).experts_config_key == "num_local_experts"


def test_spec_refuses_unknown_architecture():
    with pytest.raises(ValueError, match="unsupported architecture 'LlamaForCausalLM'; supported: Deepseek"):
        spec_from_config({"architectures": ["LlamaForCausalLM"]})


def test_fingerprint_tracks_the_shape():
    assert spec_from_config(DEEPSEEK_V3).fingerprint != spec_from_config({**DEEPSEEK_V3, "hidden_size": 128}).fingerprint
    assert spec_from_config(DEEPSEEK_V3).fingerprint == spec_from_config(dict(DEEPSEEK_V3)).fingerprint


def _keep_groups(groups, per_group=4, group_size=4):
    return [g * group_size + i for g in groups for i in range(per_group)]


def test_valid_mask_roundtrip(tmp_path):
    spec = spec_from_config(DEEPSEEK_V3)
    mask = ExpertMask.for_spec(spec, {1: _keep_groups([0, 2]), 3: list(range(16))}, "hand")
    mask.save(tmp_path / "m.json")
    loaded = ExpertMask.load(tmp_path / "m.json")
    assert loaded.resolve(spec) == {1: tuple(_keep_groups([0, 2]))}  # layer 3 keeps all: no restriction
    assert loaded.digest() == mask.digest()
    assert json.loads((tmp_path / "m.json").read_text())["format"] == "easyep-mask"


def test_hand_written_keep_only_mask_is_checked_against_the_model():
    spec = spec_from_config(QWEN3)
    assert ExpertMask.from_dict({"keep": {"2": [0, 3, 5]}}).resolve(spec) == {2: (0, 3, 5)}
    with pytest.raises(MaskError, match="layer 2 keeps 1 experts < top_k=2; keep more experts"):
        ExpertMask.from_dict({"keep": {"2": [4]}}).resolve(spec)


@pytest.mark.parametrize("keep, message", [
    ({"0": list(range(16))}, "layer 0 is not a MoE layer of DeepseekV3ForCausalLM .*remove it from the mask"),
    ({"9": [0, 1, 2, 3]}, "layer 9 is not a MoE layer"),
    ({"1": [0, 1, 2, 16]}, r"layer 1: expert ids \[16\] out of range 0..15"),
    ({"1": [0, 1, -1, 5]}, r"layer 1: expert ids \[-1\] out of range"),
    ({"1": [0, 1, 2, 2, 5]}, r"layer 1: duplicate expert ids \[2\]"),
    ({"2": [0, 1, 4]}, "layer 2 keeps 3 experts < top_k=4"),
    # one expert in each of the 4 groups: any 2 groups hold only 2 < 4.
    ({"2": [0, 4, 8, 12]}, r"layer 2: the router may choose groups \[0, 1\] .*holding only 2 kept experts < top_k=4"),
])
def test_bad_masks_are_refused(keep, message):
    spec = spec_from_config(DEEPSEEK_V3)
    with pytest.raises(MaskError, match=message):
        ExpertMask.from_dict({"keep": keep}).resolve(spec)


def test_group_reachability_uses_the_worst_boundary_choice():
    spec = spec_from_config(DEEPSEEK_V3)
    # Groups 0 and 1 keep 2 each and always outrank group 2 (1 kept): 4 >= 4, valid.
    assert ExpertMask.from_dict({"keep": {"3": [0, 1, 4, 5, 8]}}).resolve(spec)
    # Groups 0,1,2 each keep >= 2, so any two of them may be chosen; groups 1+2 hold 2+2 = 4: valid.
    assert ExpertMask.from_dict({"keep": {"1": [0, 1, 2, 4, 5, 8, 9]}}).resolve(spec)
    # Group 0 keeps 3 and outranks groups 1..3 (1 kept each); the second group holds 1: 3 + 1 = 4, valid.
    assert ExpertMask.from_dict({"keep": {"1": [0, 1, 2, 4, 8, 12]}}).resolve(spec)
    # Group 0 keeps 2, groups 1..3 keep 1 each: 2 + 1 = 3 < 4.
    with pytest.raises(MaskError, match=r"groups \[0, 1\] .*holding only 3 kept experts"):
        ExpertMask.from_dict({"keep": {"1": [0, 1, 4, 8, 12]}}).resolve(spec)


def test_softmax_groups_rank_by_best_score():
    spec = spec_from_config(DEEPSEEK_V2)
    # Softmax group-limited routing ranks a group by its best expert: one kept expert is enough to
    # compete, so groups 1..3 (1 kept each) can be chosen together with group 0.
    with pytest.raises(MaskError, match="holding only 2 kept experts"):
        ExpertMask.from_dict({"keep": {"1": [0, 1, 2, 3, 4, 8, 12]}}).resolve(spec)


def test_mask_for_another_model_is_refused():
    spec = spec_from_config(DEEPSEEK_V3)
    other = spec_from_config({**DEEPSEEK_V3, "hidden_size": 128})
    mask = ExpertMask.for_spec(other, {1: list(range(8))}, "hand")
    with pytest.raises(MaskError, match="mask was made for another model .*fingerprint"):
        mask.resolve(spec)
    qwen_mask = ExpertMask.for_spec(spec_from_config(QWEN3), {1: [0, 1]}, "hand")
    with pytest.raises(MaskError, match="architecture 'Qwen3MoeForCausalLM', this model has 'DeepseekV3ForCausalLM'"):
        qwen_mask.resolve(spec)


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"model": {}}', "'keep' must map layer ids"),
    ('{"keep": {"one": [1]}}', "layer key 'one' is not an integer"),
    ('{"keep": {"1": [0.5]}}', "layer 1: keep must be a list of integer expert ids"),
    ('{"keep": {"1": "0,1"}}', "layer 1: keep must be a list"),
    ('{"format": "other", "keep": {}}', "format 'other' is not 'easyep-mask'"),
    ('{"version": 7, "keep": {}}', "version 7 is not supported"),
])
def test_malformed_mask_files(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(MaskError, match=message):
        ExpertMask.load(path)


def test_missing_mask_file(tmp_path):
    with pytest.raises(MaskError, match="mask file .*nope.json not found"):
        ExpertMask.load(tmp_path / "nope.json")


def test_reference_matrix_import_applies_the_layer_offset():
    spec = spec_from_config(DEEPSEEK_V3)  # MoE layers 1..4: row 0 is layer 1
    rows = [[1.0] * 16 for _ in range(4)]
    rows[0] = [1.0 if e < 8 else 0.0 for e in range(16)]
    mask = ExpertMask.from_reference_matrix(rows, spec)
    assert mask.resolve(spec) == {1: tuple(range(8))}
    with pytest.raises(MaskError, match="expected 4 rows"):
        ExpertMask.from_reference_matrix(rows[:3], spec)
    with pytest.raises(MaskError, match="row 1 .layer 2. must have 16 entries"):
        ExpertMask.from_reference_matrix([rows[0], [1.0] * 15, rows[2], rows[3]], spec)
    with pytest.raises(MaskError, match="values other than 0 and 1"):
        ExpertMask.from_reference_matrix([[0.5] * 16] + rows[1:], spec)


def test_mask_cli_check_and_import(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    matrix = tmp_path / "ref.json"
    matrix.write_text(json.dumps([[1] * 8 + [0] * 8] + [[1] * 16] * 3))
    mask_main(["import-reference", str(matrix), "--model-path", str(model), "--out", str(tmp_path / "m.json")])
    mask_main(["check", str(tmp_path / "m.json"), "--model-path", str(model)])
    assert "mask on 1 of 4 MoE layers, 56/64 experts kept" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text('{"keep": {"1": [0]}}')
    with pytest.raises(SystemExit) as exit_info:
        mask_main(["check", str(tmp_path / "bad.json"), "--model-path", str(model)])
    assert exit_info.value.code == 2
    assert "layer 1 keeps 1 experts < top_k=4" in capsys.readouterr().err


def test_deepseek_v3_routing_defaults_when_transformers_omits_the_keys():
    bare = {k: v for k, v in DEEPSEEK_V3.items() if k not in ("topk_method", "scoring_func")}
    spec = spec_from_config(bare)
    assert spec.router == ROUTER_SIGMOID_BIAS and spec.n_group == 4
    assert spec_from_config({**bare, "architectures": ["DeepseekV2ForCausalLM"]}).n_group == 1
