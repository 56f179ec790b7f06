"""Offline pruner on synthetic checkpoints with DeepSeek-V3's and Qwen3-MoE's real tensor layouts (CPU only)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from easyep_sglang import prune, pruned_checkpoint, safetensors_stream
from easyep_sglang.mask import ExpertMask
from easyep_sglang.spec import spec_from_config

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


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    torch.manual_seed(0)
    root = write_checkpoint(tmp_path_factory.mktemp("ds") / "DeepSeek-V3-tiny", DEEPSEEK_CONFIG,
                            deepseek_tensors(DEEPSEEK_CONFIG), n_shards=4)
    return root, checksums(root)


WHOLE_GROUPS = {1: [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15], 2: [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]}
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


# ---- interruption ------------------------------------------------------------------------------------
DRIVER = """
import signal, sys, time
from easyep_sglang import prune, safetensors_stream
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal; a background shell starts us ignoring it
real_copy, calls = safetensors_stream.copy_range, []
def copy_then_stall(*args):
    real_copy(*args)
    calls.append(1)
    if len(calls) == 5:  # mid-write: tell the test, then stall until it signals
        open(sys.argv[1], "w").close()
        time.sleep(120)
safetensors_stream.copy_range = copy_then_stall
sys.exit(prune.main(sys.argv[2:]))
"""


def _start_and_stall(src: Path, mask: Path, out: Path, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(ready), "--model-path", str(src), "--mask", str(mask),
                             "--out", str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert list(out.parent.glob(f".{out.name}.easyep-tmp-*/*.safetensors"))  # a shard is half-written
    return proc


def test_sigint_midway_removes_partial_output(deepseek, tmp_path):
    src, before = deepseek
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    out = tmp_path / "pruned"
    proc = _start_and_stall(src, mask, out, tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert_nothing_written(out)
    assert checksums(src) == before


def test_sigkill_midway_leaves_no_output(deepseek, tmp_path, capsys):
    src, before = deepseek
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    out = tmp_path / "pruned"
    proc = _start_and_stall(src, mask, out, tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    assert not out.exists() and checksums(src) == before
    leftovers = list(tmp_path.glob(".pruned.easyep-tmp-*"))
    assert leftovers and all(p != out for p in leftovers)
    rc, err = run_main(capsys, "--model-path", src, "--mask", mask, "--out", out)  # a rerun succeeds and says so
    assert rc == 0 and "leftover" in err and str(leftovers[0]) in err


# ---- bad inputs: a one-line error, a non-zero exit, nothing written --------------------------------------
@pytest.fixture
def broken_copy(deepseek, tmp_path) -> Path:
    return Path(shutil.copytree(deepseek[0], tmp_path / "copy"))


def _expect_error(capsys, src: Path, mask: Path, out: Path, *needles: str) -> None:
    rc, err = run_main(capsys, "--model-path", src, "--mask", mask, "--out", out)
    message = err.strip().split("\n")[-1]  # below the progress bar, when writing had started
    assert rc == 1 and message.startswith("easyep prune: error: "), err
    assert all(n in message for n in needles), err
    assert_nothing_written(out)


def test_mask_for_another_model(deepseek, tmp_path, capsys):
    other = spec_from_config({**DEEPSEEK_CONFIG, "n_routed_experts": 256, "n_group": 8, "topk_group": 4})
    mask = write_mask(tmp_path / "mask.json", {1: list(range(128))}, other)
    _expect_error(capsys, deepseek[0], mask, tmp_path / "out", "another model", "select a mask for this model")


def test_missing_shard(broken_copy, tmp_path, capsys):
    (broken_copy / "model-00003-of-00004.safetensors").unlink()
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    _expect_error(capsys, broken_copy, mask, tmp_path / "out", "model-00003-of-00004.safetensors", "missing")


def test_corrupt_index(broken_copy, tmp_path, capsys):
    (broken_copy / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    _expect_error(capsys, broken_copy, mask, tmp_path / "out", "model.safetensors.index.json is corrupt")


def test_corrupt_and_truncated_shard(broken_copy, tmp_path, capsys):
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    shard = broken_copy / "model-00002-of-00004.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:8] + b"#garbage" + data[16:])
    _expect_error(capsys, broken_copy, mask, tmp_path / "out", str(shard), "corrupt header")
    shard.write_bytes(data[:-100])
    _expect_error(capsys, broken_copy, mask, tmp_path / "out", str(shard), "truncated")


def test_missing_config(broken_copy, tmp_path, capsys):
    (broken_copy / "config.json").unlink()
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    _expect_error(capsys, broken_copy, mask, tmp_path / "out", "config.json not found")


def test_existing_out_needs_force(deepseek, tmp_path, capsys):
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = run_main(capsys, "--model-path", deepseek[0], "--mask", mask, "--out", out)
    assert rc == 1 and "already exists" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    rc, err = run_main(capsys, "--model-path", deepseek[0], "--mask", mask, "--out", out, "--force")
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not list(tmp_path.glob(".out.easyep-*"))


def test_out_inside_model_dir_is_refused(deepseek, tmp_path, capsys):
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    src, before = deepseek
    rc, err = run_main(capsys, "--model-path", src, "--mask", mask, "--out", src / "pruned")
    assert rc == 1 and "overlaps" in err and checksums(src) == before


def test_full_disk_tmpfs(deepseek, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
        _expect_error(capsys, deepseek[0], mask, small / "out", f"device holding {small}", "choose another --out")
        assert not list(small.iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_disk_full_midway(deepseek, tmp_path, capsys, monkeypatch):
    real_copy, calls = safetensors_stream.copy_range, []

    def copy_until_full(*args):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(*args)

    monkeypatch.setattr(safetensors_stream, "copy_range", copy_until_full)
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    out = tmp_path / "deep" / "out"
    _expect_error(capsys, deepseek[0], mask, out, f"no space left on the device holding {out.parent}")
    assert checksums(deepseek[0]) == deepseek[1]


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
