"""Every bad input to the launcher exits non-zero, with a one-line reason, before SGLang starts."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from easyep_sglang.serving.launch import prepare
from easyep_sglang.serving.launch_checks import OVERLAP_FIX, check_settings, settings_from_cli
from easyep_sglang.sglang_plugin.server_env import CPU_SHIM_DIR
from easyep_sglang.sglang_plugin.settings import PluginSettings


def _launch(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "easyep_sglang.launch", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


BAD_MASKS = [
    ("malformed", "{not json", "is not valid JSON"),
    ("not-moe-layer", {"keep": {"0": [0, 1, 2, 3]}}, "layer 0 is not a MoE layer of DeepseekV3ForCausalLM"),
    ("out-of-range", {"keep": {"1": [0, 1, 2, 99]}}, r"layer 1: expert ids [99] out of range 0..15"),
    ("duplicate", {"keep": {"1": [0, 1, 1, 2, 3]}}, "layer 1: duplicate expert ids [1]"),
    ("below-top-k", {"keep": {"2": [0, 1, 2]}}, "layer 2 keeps 3 experts < top_k=4; keep more experts"),
    ("unreachable", {"keep": {"1": [0, 4, 8, 12]}}, "holding only 2 kept experts < top_k=4"),
    ("other-model", {"model": {"architecture": "Qwen3MoeForCausalLM"}, "keep": {}}, "mask was made for another model"),
    ("bad-layer-key", {"keep": {"first": [0]}}, "layer key 'first' is not an integer"),
]


@pytest.mark.parametrize("name, content, message", BAD_MASKS, ids=[b[0] for b in BAD_MASKS])
def test_bad_mask_exits_before_sglang_starts(tmp_path, tiny_models, name, content, message):
    mask = _write(tmp_path / f"{name}.json", content)
    result = _launch("--model-path", tiny_models["deepseek_v3"], "--mask", mask)
    assert result.returncode == 2
    assert message in result.stderr
    assert "sglang.launch_server" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_missing_mask_and_model(tmp_path, tiny_models):
    result = _launch("--model-path", tiny_models["deepseek_v3"], "--mask", tmp_path / "absent.json")
    assert result.returncode == 2 and "mask file" in result.stderr and "not found" in result.stderr
    result = _launch("--model-path", tmp_path / "no-model", "--mask", tmp_path / "absent.json")
    assert result.returncode == 2 and "config.json not found; --model-path must be a local" in result.stderr


def test_unsupported_architecture_lists_the_supported(tmp_path):
    model = tmp_path / "llama"
    model.mkdir()
    _write(model / "config.json", {"architectures": ["LlamaForCausalLM"]})
    _write(tmp_path / "m.json", {"keep": {}})
    result = _launch("--model-path", model, "--mask", tmp_path / "m.json")
    assert result.returncode == 2
    assert "unsupported architecture 'LlamaForCausalLM'; supported: DeepseekV2ForCausalLM" in result.stderr


def test_missing_model_path_is_a_usage_error():
    result = _launch("--mask", "m.json")
    assert result.returncode == 2 and "--model-path" in result.stderr


def test_cpu_setup_adds_defaults_the_user_did_not_give(tiny_models, tmp_path):
    mask = _write(tmp_path / "m.json", {"keep": {"1": list(range(8))}})
    argv, env = prepare(["--model-path", str(tiny_models["deepseek_v3"]), "--mask", str(mask),
                         "--max-total-tokens", "2048", "--port", "1234", "--device", "cpu"])
    assert argv.count("--max-total-tokens") == 1 and argv[argv.index("--max-total-tokens") + 1] == "2048"
    assert "--attention-backend" in argv and "--disable-cuda-graph" in argv and "--sleep-on-idle" in argv
    assert "--port" in argv
    assert PluginSettings.from_env(env) == PluginSettings(mask=mask.resolve()) and env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert env["PYTHONPATH"].split(":")[0] == str(CPU_SHIM_DIR)


def test_no_mask_sets_no_mask_env(tiny_models, monkeypatch):
    for key, value in PluginSettings(mask=Path("/stale/mask.json"), prune=True, stats_dir=Path("/stale")).to_env().items():
        monkeypatch.setenv(key, value)
    _, env = prepare(["--model-path", str(tiny_models["qwen3_moe"]), "--device", "cpu"])
    assert PluginSettings.from_env(env) == PluginSettings()


def _prune_tiny(tiny_models, tmp_path, keep):
    from easyep_sglang.checkpoint.prune import prune_checkpoint
    from easyep_sglang.core.mask import ExpertMask
    from easyep_sglang.core.spec import spec_from_model_path

    model = tiny_models["deepseek_v3"]
    ExpertMask.for_spec(spec_from_model_path(model), keep, "hand").save(tmp_path / "mask.json")
    return prune_checkpoint(model, tmp_path / "mask.json", tmp_path / "pruned")


def test_plugin_served_pruned_checkpoint_restores_the_source_routing_space(tiny_models, tmp_path):
    pruned = _prune_tiny(tiny_models, tmp_path, {1: [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14], 2: [0, 1, 4, 5, 8, 12]})
    argv, env = prepare(["--model-path", str(pruned), "--device", "cpu"])
    overrides = json.loads(argv[argv.index("--json-model-override-args") + 1])
    assert overrides == {"n_routed_experts": 16, "n_group": 4, "topk_group": 2}
    assert PluginSettings.from_env(env) == PluginSettings(pruned_checkpoint=True)
    result = _launch("--model-path", pruned, "--mask", tmp_path / "mask.json")
    assert result.returncode == 2 and "is already pruned; serve it without --mask" in result.stderr


def test_stock_exact_pruned_checkpoint_needs_no_plugin(tiny_models, tmp_path):
    pruned = _prune_tiny(tiny_models, tmp_path, {1: [0, 1, 2, 3, 8, 9, 10, 11], 2: [4, 5, 6, 7, 12, 13, 14, 15]})
    argv, env = prepare(["--model-path", str(pruned), "--device", "cpu"])
    assert "--json-model-override-args" not in argv and PluginSettings.from_env(env) == PluginSettings()



# ---- SGLang settings a mode cannot serve (serving/launch_checks.py) ----------------------------------------
SPLIT_KEEP = {1: [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14], 2: [0, 1, 4, 5, 8]}  # 12 and 5 kept


@pytest.mark.parametrize("flags, refused, mask_ok", [
    (["--enable-eplb"], "--prune cannot be served with --enable-eplb", True),
    (["--init-expert-location", "placement.json"], "drop --init-expert-location", True),
    (["--ep-dispatch-algorithm=static"], "drop --ep-dispatch-algorithm", True),
    (["--ep-num-redundant-experts", "2"], "drop --ep-num-redundant-experts", True),
    (["--ep-size", "4"], "layer 2 keeps 5 experts, not a multiple of the expert-parallel size 4 that FusedMoE "
                         "splits them over; keep 4 or 8 experts in that layer (python -m easyep_sglang.select "
                         "--multiple-of 4), or lower --ep-size", True),
    (["--moe-a2a-backend", "deepep", "--tp", "2"], "size 2 that FusedMoE splits them over; keep 4 or 6", True),
    (["--startup-weight-load-mode", "overlap"], OVERLAP_FIX, False),
    (["--moe-runner-backend", "flashinfer_trtllm"], "--prune cannot be served with --moe-runner-backend "
                                                    "flashinfer_trtllm, which picks experts inside its kernel", True),
])
def test_prune_refuses_expert_placement_indivisible_ep_and_overlap(tiny_models, tmp_path, flags, refused, mask_ok):
    model = str(tiny_models["deepseek_v3"])
    mask = _write(tmp_path / "m.json", {"keep": {str(l): ids for l, ids in SPLIT_KEEP.items()}})
    with pytest.raises(ValueError) as err:
        prepare(["--model-path", model, "--mask", str(mask), "--prune", "--device", "cpu", *flags])
    assert refused in str(err.value) and "\n" not in str(err.value)
    if mask_ok:  # a mask alone serves under EPLB (pruned experts keep their slots) and EP (all experts built)
        prepare(["--model-path", model, "--mask", str(mask), "--device", "cpu", *flags])
    prepare(["--model-path", model, "--device", "cpu", *flags])  # no plugin, no refusal


def test_plugin_served_pruned_checkpoint_refuses_eplb_and_indivisible_ep(tiny_models, tmp_path):
    pruned = str(_prune_tiny(tiny_models, tmp_path, SPLIT_KEEP))
    with pytest.raises(ValueError, match="a plugin-served pruned checkpoint cannot be served with --enable-eplb"):
        prepare(["--model-path", pruned, "--device", "cpu", "--enable-eplb"])
    with pytest.raises(ValueError, match="layer 2 keeps 5 experts, not a multiple of the expert-parallel size 2"):
        prepare(["--model-path", pruned, "--device", "cpu", "--ep", "2"])
    prepare(["--model-path", pruned, "--device", "cpu", "--init-expert-location", "trivial"])


def test_stock_exact_pruned_checkpoint_under_ep_needs_a_divisible_count(tiny_models, tmp_path):
    pruned = str(_prune_tiny(tiny_models, tmp_path, {1: list(range(12)), 2: list(range(4, 16))}))  # exact, 12 each
    with pytest.raises(ValueError, match="layer 1 keeps 12 experts, not a multiple of the expert-parallel size 8"):
        prepare(["--model-path", pruned, "--device", "cuda", "--tp", "8", "--ep", "8"])
    prepare(["--model-path", pruned, "--device", "cuda", "--tp", "8", "--ep", "4"])


def test_all_to_all_dispatch_needs_one_expert_count_in_every_layer(tiny_models, tmp_path):
    model = str(tiny_models["deepseek_v3"])
    varying = _write(tmp_path / "varying.json", {"keep": {"1": list(range(12)), "2": list(range(8))}})
    uniform = _write(tmp_path / "uniform.json", {"keep": {"1": list(range(8)), "2": list(range(8, 16))}})
    a2a = ["--moe-a2a-backend", "deepep", "--tp", "2"]
    with pytest.raises(ValueError, match="--prune cannot be served with --moe-a2a-backend deepep while MoE layers "
                                         r"hold different expert counts \(8, 12\)"):
        prepare(["--model-path", model, "--mask", str(varying), "--prune", "--device", "cpu", *a2a])
    prepare(["--model-path", model, "--mask", str(uniform), "--prune", "--device", "cpu", *a2a])
    prepare(["--model-path", model, "--mask", str(varying), "--device", "cpu", *a2a])  # a mask builds every expert


@pytest.mark.parametrize("flags, message", [
    (["--attn-dp-size", "2"], "under DP attention (attention DP size 2); calibrate with --attn-dp-size 1"),
    (["--dp-size", "2", "--enable-dp-attention"], "under DP attention (attention DP size 2)"),
    (["--expert-parallel-size", "2"], "cannot record expert-parallel experts (EP size 2)"),
    (["--startup-weight-load-mode=overlap"], OVERLAP_FIX),
    (["--enable-eplb"], "--record-stats cannot record under --enable-eplb: SGLang hands the recorder physical "
                        "expert slots, not expert ids; calibrate without --enable-eplb"),
    (["--ep-num-redundant-experts", "4"], "cannot record under --ep-num-redundant-experts"),
])
def test_record_stats_refuses_dp_attention_ep_placement_and_overlap(tiny_models, tmp_path, flags, message):
    argv = ["--model-path", str(tiny_models["qwen3_moe"]), "--device", "cpu", "--record-stats", str(tmp_path)]
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(argv + flags)
    prepare(argv + ["--dp-size", "2"])  # data-parallel replicas without DP attention are not refused


@pytest.mark.parametrize("quantization, refused", [
    ({"quant_method": "fp8"}, "(fp8, blocks None)"),  # per-tensor FP8
    ({"quant_method": "awq", "weight_block_size": [128, 128]}, "(awq, blocks [128, 128])"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, None),  # DeepSeek's FP8 release: recorded
])
def test_record_stats_refuses_a_quantized_checkpoint_unless_fp8_blocks(tiny_models, tmp_path, quantization, refused):
    model = tmp_path / "quantized"
    shutil.copytree(tiny_models["deepseek_v3"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    argv = ["--model-path", str(model), "--device", "cpu", "--record-stats", str(tmp_path / "stats")]
    if refused:
        with pytest.raises(ValueError, match=re.escape(f"quantized {refused}; calibrate a bf16 copy of the checkpoint")):
            prepare(argv)
    else:
        prepare(argv)
    prepare(["--model-path", str(model), "--device", "cpu"])  # served as it is


def test_mask_refuses_fake_dispatch_which_routes_at_random(tiny_models, tmp_path):
    model = str(tiny_models["deepseek_v3"])
    mask = _write(tmp_path / "m.json", {"keep": {str(l): ids for l, ids in SPLIT_KEEP.items()}})
    with pytest.raises(ValueError, match="--ep-dispatch-algorithm fake routes tokens to random experts"):
        prepare(["--model-path", model, "--mask", str(mask), "--device", "cpu", "--ep-dispatch-algorithm", "fake"])
    prepare(["--model-path", model, "--device", "cpu", "--ep-dispatch-algorithm", "fake"])  # no mask: SGLang's own


def test_engine_keyword_arguments_are_checked_alike():
    with pytest.raises(ValueError, match="attention DP size 2"):
        check_settings({"attn_dp_size": 2}, tp_size=2, record_stats=True)
    with pytest.raises(ValueError, match=re.escape(OVERLAP_FIX)):
        check_settings({"startup_weight_load_mode": "overlap"}, tp_size=1, masked=True)
    with pytest.raises(ValueError, match="invalid int value: 'two'; fix the SGLang argument"):
        settings_from_cli(["--ep-size", "two"])


@pytest.mark.parametrize("flags, binding", [
    (["--tp-size", "2"], "0|1"),  # two TP ranks on this machine
    (["--dp-size", "2"], "0|1"),  # two replicas of one rank each
    (["--tp-size", "2", "--attn-dp-size", "2"], "0|1"),  # DP attention splits the TP ranks, adds none
    (["--tp-size", "2", "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "10.0.0.1:5000"], "0-1"),  # one per node
])
def test_each_scheduler_on_this_node_gets_its_share_of_the_cores(tiny_models, flags, binding, monkeypatch):
    """On a CPU the launcher binds the schedulers SGLang starts on this node (DP x TP x PP over --nnodes) to equal
    shares of the cores; SGLang asserts one share per scheduler (utils/numa_utils.py, init_threads_binding)."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    _, env = prepare(["--model-path", str(tiny_models["qwen3_moe"]), "--device", "cpu", *flags])
    assert env.get("SGLANG_CPU_OMP_THREADS_BIND") == binding
