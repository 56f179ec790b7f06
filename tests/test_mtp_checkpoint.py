"""Next-n (MTP) layers in offline-pruned checkpoints, without SGLang: the tiny model's MTP layer, the
`stock_engine` label counting it, and the refusals (issue 10, item 2).

SGLang's NextN draft reads the same config.json as the main model, so an `exact` checkpoint must give its MTP
layer the count and groups of the MoE layers; tests/test_mtp_nextn.py loads the checkpoints into SGLang.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from server_specs import MASKS

from easyep_sglang.checkpoint import prune
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.demo.tiny_models import build_tiny_model
from easyep_sglang.serving.launch import prepare

MTP = 3  # the tiny DeepSeek-V3's next-n layer: decoder layers 0-2, MoE layers 1 and 2
WHOLE = MASKS["deepseek_v3/whole"]  # layers 1 and 2 keep 2 whole groups of 4
NAMED = MASKS["deepseek_v3_mtp/whole"]  # the same, and so does the MTP layer


@pytest.fixture(scope="module")
def mtp_model(model_store):
    return model_store.model("deepseek_v3_mtp/fp32")


def _prune(capsys, model, keep, tmp_path, name="pruned"):
    mask = tmp_path / f"{name}.json"
    ExpertMask.for_spec(spec_from_model_path(model), keep, "test").save(mask)
    rc = prune.main(["--model-path", str(model), "--mask", str(mask), "--out", str(tmp_path / name)])
    return rc, capsys.readouterr().err, tmp_path / name


def test_mtp_option_adds_a_next_n_layer_and_keeps_the_main_model(model_store, mtp_model, tmp_path):
    plain = load_file(model_store.model("deepseek_v3/fp32") / "model.safetensors")
    with_mtp = load_file(mtp_model / "model.safetensors")
    assert all(torch.equal(with_mtp[n], t) and with_mtp[n].dtype == t.dtype for n, t in plain.items())
    spec, plain_spec = spec_from_model_path(mtp_model), spec_from_model_path(model_store.model("deepseek_v3/fp32"))
    assert spec.mtp_layers == (MTP,) and spec.fingerprint == plain_spec.fingerprint  # masks fit both
    added = {n.removeprefix(f"model.layers.{MTP}.") for n in set(with_mtp) - set(plain)}
    assert {f"mlp.experts.{e}.{p}_proj.weight" for e in range(16) for p in ("gate", "up", "down")} <= added
    assert {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
            "embed_tokens.weight", "mlp.gate.weight", "mlp.gate.e_score_correction_bias"} <= added
    assert with_mtp[f"model.layers.{MTP}.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert not torch.equal(with_mtp[f"model.layers.{MTP}.mlp.gate.weight"], plain["model.layers.2.mlp.gate.weight"])
    with pytest.raises(ValueError, match="qwen3_moe has no next-n .MTP. layers; build one of deepseek_v3"):
        build_tiny_model("qwen3_moe", tmp_path / "qwen", num_nextn_predict_layers=1)


def test_an_mtp_layer_left_out_of_the_mask_makes_the_checkpoint_plugin_only(mtp_model, tmp_path, capsys):
    """Stock SGLang's NextN draft would build the full MTP layer with the pruned count: a size assert at load."""
    rc, err, out = _prune(capsys, mtp_model, WHOLE, tmp_path)
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["easyep"]["stock_engine"] == "plugin-only"
    assert config["easyep"]["per_layer_experts"] == {"1": 8, "2": 8, str(MTP): 16}
    assert config["n_routed_experts"] == 16  # the largest count: stock engines refuse the 8-expert layers
    assert "the MoE layers alone keep 8 experts each and would be exact, but MTP layer(s) [3] keep 16" in err


def test_an_mtp_layer_pruned_like_the_moe_layers_stays_exact(mtp_model, tmp_path, capsys):
    rc, err, out = _prune(capsys, mtp_model, NAMED, tmp_path)
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["easyep"]["stock_engine"] == "exact"
    assert (config["n_routed_experts"], config["n_group"], config["topk_group"]) == (8, 2, 2)
    tensors = load_file(out / "model.safetensors")
    assert {n for n in tensors if n.startswith(f"model.layers.{MTP}.mlp.experts.") and n.endswith("up_proj.weight")} \
        == {f"model.layers.{MTP}.mlp.experts.{e}.up_proj.weight" for e in range(8)}


REFUSED = {  # MTP layer pruned into a checkpoint that is not exact -> the fix the one-line error names
    "other-count": ({**WHOLE, MTP: list(range(12))},
                    "keep 8 experts in layer(s) [3] as the MoE layers do, 4 in each of 2 groups"),
    "split-groups": ({1: [0, 1, 2, 4, 5, 6, 8, 12], 2: [1, 3, 5, 7, 9, 11, 13, 15], MTP: list(range(8))},
                     "remove layer(s) [3] from the mask: the MoE layers alone are approximate"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_pruned_mtp_layer_is_refused_unless_the_checkpoint_is_exact(mtp_model, tmp_path, capsys, case):
    """Our launcher builds SGLang's draft model in full, so only stock routing serves a pruned MTP layer."""
    keep, fix = REFUSED[case]
    rc, err, out = _prune(capsys, mtp_model, keep, tmp_path)
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("easyep prune: error: MTP layer(s) [3] are pruned") and fix in err, err
    assert not out.exists() and not list(tmp_path.glob(".pruned.easyep-tmp-*"))


def test_the_launcher_refuses_a_checkpoint_an_earlier_pruner_labelled_exact(mtp_model, tmp_path, capsys):
    """The issue's checkpoint: MoE layers pruned to whole groups, the MTP layer full, and config.json saying
    `exact` with 8 experts (what the pruner wrote before MTP layers were counted)."""
    rc, err, out = _prune(capsys, mtp_model, WHOLE, tmp_path)
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    config.update(n_routed_experts=8, n_group=2, topk_group=2)
    config["easyep"]["stock_engine"] = "exact"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as refused:
        prepare(["--model-path", str(out)])
    message = str(refused.value)
    assert "says stock_engine 'exact', but its layers' kept experts make it 'plugin-only'" in message
    assert message.endswith("re-run python -m easyep_sglang.prune") and "\n" not in message


def test_speculative_decoding_on_a_cpu_is_refused_before_start(mtp_model):
    """SGLang loads the NEXTN draft on this CPU, then stops in the draft worker's setup (torch.cuda.synchronize
    in models/deepseek_v2.py set_embed_and_head; then no torch_native draft attention backend)."""
    with pytest.raises(ValueError) as refused:
        prepare(["--model-path", str(mtp_model), "--device", "cpu", "--speculative-algorithm", "NEXTN"])
    assert str(refused.value).startswith("--speculative-algorithm NEXTN does not run on a CPU in SGLang 0.5.23")
    assert str(refused.value).endswith("drop --speculative-algorithm, or serve on a GPU")
