"""Capacity planner: exact bytes on real tiny checkpoints, published DeepSeek-R1 figures from its config."""

import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from easyep_sglang.checkpoint.capacity import capacity, classify, footprint, main, parse_bytes
from easyep_sglang.checkpoint.shapes import checkpoint_weights, estimate_weights
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.spec import spec_from_config, spec_from_model_path
from easyep_sglang.demo.tiny_models import build_tiny_model

# The shape-fixing values of the published config.json files, shipped for the planner's README tables.
CONFIGS = Path(__file__).resolve().parent.parent / "launch" / "configs"
R1_CONFIG = json.loads((CONFIGS / "deepseek_r1.json").read_text())
# The published DeepSeek-V3/R1 safetensors headers hold 91,991 tensors totalling 688,574,839,360 bytes
# (as listed by the model-inspect tool from the Hugging Face headers; V3 and R1 share every shape).
R1_HEADER_TENSORS, R1_HEADER_BYTES = 91_991, 688_574_839_360
GIB = 1 << 30


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe"])
def tiny(request, tmp_path_factory):
    return build_tiny_model(request.param, tmp_path_factory.mktemp("plan") / request.param)


def real_tensor_bytes(model_dir):
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return {name: f.get_tensor(name).numel() * f.get_tensor(name).element_size() for name in f.keys()}


def test_header_bytes_equal_the_real_tensor_bytes(tiny):
    real = real_tensor_bytes(tiny)
    assert {w.name: w.nbytes for w in checkpoint_weights(tiny)} == real
    spec = spec_from_model_path(tiny)
    fp = footprint(checkpoint_weights(tiny), spec, keep={})
    assert sum(fp.nbytes.values()) == sum(real.values())
    assert fp.nbytes["routed_experts"] == sum(n for k, n in real.items() if ".mlp.experts." in k)
    assert fp.nbytes["router"] == sum(n for k, n in real.items() if ".mlp.gate." in k)


def test_config_estimate_equals_the_headers(tiny):
    config = json.loads((tiny / "config.json").read_text())
    estimated = {w.name: (w.nbytes, w.numel) for w in estimate_weights(config)}
    assert estimated == {w.name: (w.nbytes, w.numel) for w in checkpoint_weights(tiny)}


def test_pruned_bytes_are_exactly_the_kept_tensors(tiny):
    spec = spec_from_model_path(tiny)
    kept = tuple(range(0, spec.n_experts, 2))
    mask = ExpertMask.for_spec(spec, {layer: kept for layer in spec.moe_layers}, method="test")
    fp = footprint(checkpoint_weights(tiny), spec, mask.resolve(spec))
    real = real_tensor_bytes(tiny)
    expert_bytes = sum(n for k, n in real.items() if ".mlp.experts." in k and int(k.split(".")[5]) in kept)
    assert fp.nbytes["routed_experts"] == expert_bytes
    assert fp.nbytes["router"] * 2 == sum(n for k, n in real.items() if ".mlp.gate." in k)
    assert fp.nbytes["dense"] == sum(n for k, n in real.items() if ".mlp.experts." not in k and ".mlp.gate." not in k)


def test_deepseek_r1_from_its_config():
    weights = estimate_weights(R1_CONFIG)
    assert (len(weights), sum(w.nbytes for w in weights)) == (R1_HEADER_TENSORS, R1_HEADER_BYTES)
    assert abs(sum(w.nbytes for w in weights) / 700e9 - 1) < 0.03  # "~700 GB in FP8": within 3%
    spec = spec_from_config(R1_CONFIG)
    fp = footprint(weights, spec, keep={})
    assert fp.served_params == pytest.approx(671e9, rel=0.005)  # the published 671B (main model)
    assert fp.served_params + fp.params["mtp"] == pytest.approx(685e9, rel=0.005)  # 685B with the MTP layer
    assert classify("model.layers.61.mlp.experts.3.up_proj.weight", spec) == ("mtp", 61, 3)
    assert classify("model.layers.3.mlp.gate.e_score_correction_bias", spec) == ("router", 3, None)


def test_qwen3_30b_a3b_from_its_config():
    config = json.loads((CONFIGS / "qwen3_30b_a3b.json").read_text())
    fp = footprint(estimate_weights(config), spec_from_config(config), {})
    assert fp.served_params == pytest.approx(30.5e9, rel=0.005)  # the published 30.5B


def test_deepseek_r1_fits_one_node_only_when_pruned():
    spec = spec_from_config(R1_CONFIG)
    weights = estimate_weights(R1_CONFIG)
    fits = {}
    for keep in (256, 128, 64):
        fp = footprint(weights, spec, {l: tuple(range(keep)) for l in spec.moe_layers} if keep < 256 else {})
        fits[keep] = capacity(fp, R1_CONFIG, spec, 8, 80 * GIB, 0.9, 2, 32768).fits
        if keep == 128:  # MLA: 61 layers x (512 + 64) x 2 bytes per token on each GPU
            left = 80 * GIB * 0.9 - math.ceil(fp.served_bytes / 8)
            assert capacity(fp, R1_CONFIG, spec, 8, 80 * GIB, 0.9, 2, 0).kv_tokens == int(left // (61 * 576 * 2))
    assert fits == {256: False, 128: True, 64: True}
    assert capacity(footprint(weights, spec, {}), R1_CONFIG, spec, 8, 141 * 10**9, 0.9, 2, 32768).fits  # 8xH200


def test_cli_prints_the_table(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(R1_CONFIG))
    main(["--config", str(config), "--keep", "256", "128", "64", "--gpus", "8", "--gpu-mem", "80GiB"])
    out = capsys.readouterr().out
    print(out)
    table = out[: out.index("MTP/next-n")]  # the capacity table, before the same-hardware one
    rows = [line for line in table.splitlines() if line.startswith(("| 256 ", "| 128 ", "| 64 "))]
    assert [r.split("|")[8].strip() for r in rows] == ["no", "yes", "yes"]
    assert [r.split("|")[10].strip() for r in rows] == ["16", "8", "4"]
    assert "MTP/next-n" in out


def test_same_hardware_shapes_and_predicted_ratios(tmp_path, capsys):
    """R1 on 8 x 80 GB GPUs per node: the full model needs two nodes (TP across them); 128 experts fit one node, so
    the same 16 GPUs hold 2 replicas, and 64 experts 4. The ratios follow from the replicas alone (the paper
    measured 2.99x and 4.33x, where inter-node TP also slows the full model)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(R1_CONFIG))
    main(["--config", str(config), "--keep", "256", "128", "64", "--gpus", "8", "--gpu-mem", "80GB"])
    out = capsys.readouterr().out
    assert "Same hardware, the full model's 16 GPUs (2 node(s) of 8)" in out
    rows = out[out.index("| experts/layer | GPUs per replica"):].splitlines()[2:5]
    assert [[cell.strip() for cell in row.split("|")[1:-1]] for row in rows] == [
        ["256", "16 (TP across nodes)", "1", "1.00 (predicted)"],
        ["128", "8", "2", "2.00 (predicted)"],
        ["64", "4", "4", "4.00 (predicted)"],
    ]
    assert "TP crosses nodes" in out


def test_calibration_needs_of_r1_as_stored_and_as_a_bf16_copy(tmp_path, capsys):
    """R1 as released (FP8) calibrates on one 8xH200 node; a bf16 copy (about 1.34 TB) needs two."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(R1_CONFIG))
    main(["--config", str(config), "--gpus", "8", "--gpu-mem", "141GB"])
    out = capsys.readouterr().out
    assert "- calibrating as stored (FP8): 673.2 GB of weights; 8 GPUs, 1 node(s) of 8 x 141GB" in out
    bf16 = next(line for line in out.splitlines() if line.startswith("- calibrating a bf16 copy"))
    assert bf16.endswith("16 GPUs, 2 node(s) of 8 x 141GB") and " 1.3 TB " in bf16, bf16
    # one expert's w13 [2 x 2048, 7168] in float32
    assert f"at most {2 * 2048 * 7168 * 4 / 1e6:.1f} MB per GPU (TP=1)" in out


def test_calibration_needs_of_a_bf16_checkpoint_are_one_line(tiny, capsys):
    main(["--model-path", str(tiny), "--gpus", "1", "--gpu-mem", "24GiB", "--min-kv-tokens", "0"])
    out = capsys.readouterr().out
    assert "- calibrating as stored: " in out and "bf16 copy" not in out and "dequantizes" not in out


def test_errors_name_the_fix(tmp_path, capsys):
    assert parse_bytes("80GiB") == 80 * GIB and parse_bytes("141GB") == 141 * 10**9
    with pytest.raises(ValueError, match="80GiB"):
        parse_bytes("eighty")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(R1_CONFIG))
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--keep", "4"])
    assert "keep between top_k=8 and 256" in capsys.readouterr().err
