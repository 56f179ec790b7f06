"""Offline pruner throughput, peak memory and output size on a synthetic DeepSeek-V3-layout checkpoint.

    .venv/bin/python -m bench.micro.prune_throughput [--size-gb 2] [--keep 0.5] [--shard-gb 0.5] [--repeat 3]
        [--tmp-dir /tmp]

Builds a checkpoint of random bf16 tensors (embedding, attention, a dense layer, MoE layers of 64 experts in
8 groups) in a temp dir, prunes it to `--keep` of each MoE layer's experts with a random valid mask, and prints:
- throughput: bytes written per second by the pruner (a subprocess, wall time including interpreter start)
  over the same for `shutil.copyfile` of the source shards, both followed by fsync as the pruner does (goal >= 0.8);
- the pruner's peak RSS (its VmHWM) over the largest tensor (goal <= 1.5);
- pruned tensor bytes over ideal bytes = dense part + kept experts + kept router rows (goal 1.000).
Everything lives under --tmp-dir and is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from easyep_sglang.checkpoint import tensor_names
from easyep_sglang.checkpoint.safetensors_stream import read_checkpoint
from easyep_sglang.core.mask import ExpertMask, MaskError
from easyep_sglang.core.spec import spec_from_config

ROOT = Path(__file__).resolve().parents[1]  # the pruner's child runs here: `python -c` puts it first on sys.path

HIDDEN, MOE_INTER, DENSE_INTER, VOCAB, EXPERTS = 1024, 512, 4096, 32768, 64
MiB = 1 << 20


def bench_config(n_layers: int) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": HIDDEN,
        "intermediate_size": DENSE_INTER, "moe_intermediate_size": MOE_INTER, "vocab_size": VOCAB,
        "num_hidden_layers": n_layers, "first_k_dense_replace": 1, "n_routed_experts": EXPERTS,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "num_nextn_predict_layers": 0, "torch_dtype": "bfloat16",
    }


def tensor_shapes(config: dict):
    """(name, shape) of every tensor, in checkpoint order."""
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        yield f"{p}.input_layernorm.weight", (HIDDEN,)
        yield f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)
        yield f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)
        yield f"{p}.post_attention_layernorm.weight", (HIDDEN,)
        mlps = [(f"{p}.mlp", DENSE_INTER)] if layer < config["first_k_dense_replace"] else [
            *((f"{p}.mlp.experts.{e}", MOE_INTER) for e in range(EXPERTS)), (f"{p}.mlp.shared_experts", MOE_INTER)]
        for prefix, inter in mlps:
            yield f"{prefix}.gate_proj.weight", (inter, HIDDEN)
            yield f"{prefix}.up_proj.weight", (inter, HIDDEN)
            yield f"{prefix}.down_proj.weight", (HIDDEN, inter)
        if layer >= config["first_k_dense_replace"]:
            yield f"{p}.mlp.gate.weight", (EXPERTS, HIDDEN)
            yield f"{p}.mlp.gate.e_score_correction_bias", (EXPERTS,)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def build_checkpoint(root: Path, size_gb: float, shard_gb: float, rng: np.random.Generator) -> dict:
    per_moe_layer = (3 * EXPERTS + 3) * MOE_INTER * HIDDEN * 2 + 2 * HIDDEN * HIDDEN * 2
    n_layers = max(2, 1 + round((size_gb * 1e9 - 2 * VOCAB * HIDDEN * 2) / per_moe_layer))
    config = bench_config(n_layers)
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "tokenizer.json").write_text("{}")
    shards, current, current_bytes = [], {}, 0
    for name, shape in tensor_shapes(config):
        n = int(np.prod(shape)) * 2
        current[name] = torch.frombuffer(bytearray(rng.bytes(n)), dtype=torch.bfloat16).reshape(shape)
        current_bytes += n
        if current_bytes >= shard_gb * 1e9:
            shards.append(current)
            current, current_bytes = {}, 0
    shards += [current] if current else []
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, root / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        total += sum(t.numel() * 2 for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return config


def random_mask(config: dict, keep: float, seed: int) -> ExpertMask:
    spec = spec_from_config(config)
    rand = random.Random(seed)
    n_keep = max(spec.top_k, round(keep * spec.n_experts))
    while True:  # redraw until every reachable group choice offers top_k kept experts
        mask = ExpertMask.for_spec(spec, {l: rand.sample(range(spec.n_experts), n_keep) for l in spec.moe_layers},
                                   method="random")
        try:
            mask.resolve(spec)
            return mask
        except MaskError:
            continue


def ideal_bytes(model: Path, kept: dict[int, tuple[int, ...]]) -> int:
    """Dense part + kept experts + kept router rows, counted from the source headers."""
    total = 0
    for header in read_checkpoint(model)[1].values():
        for name, t in header.tensors.items():
            if (expert := tensor_names.expert_tensor(name)) and expert.layer in kept:
                total += t.nbytes * (expert.expert in kept[expert.layer])
            elif (layer := tensor_names.router_layer(name)) in kept:
                total += t.nbytes // t.shape[0] * len(kept[layer])
            else:
                total += t.nbytes
    return total


def copy_all(src: Path, dst: Path, fsync: bool) -> float:
    dst.mkdir()
    start = time.perf_counter()
    for shard in sorted(src.glob("*.safetensors")):
        shutil.copyfile(shard, dst / shard.name)
        if fsync:
            fd = os.open(dst / shard.name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    elapsed = time.perf_counter() - start
    shutil.rmtree(dst)
    os.sync()
    return elapsed


# The child reports VmHWM, its own peak RSS since exec. Not ru_maxrss: after vfork+exec that also counts the
# parent's pages (this bench holds torch and the tensors it wrote).
CHILD = """import sys
from easyep_sglang.checkpoint.prune import main
rc = main(sys.argv[1:])
print("VmHWM", next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")), file=sys.stderr)
sys.exit(rc)
"""


def run_pruner(model: Path, mask: Path, out: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of the pruner run as a child process."""
    cmd = [sys.executable, "-c", CHILD, "--model-path", str(model), "--mask", str(mask), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"pruner failed:\n{proc.stderr}")
    lines = proc.stderr.strip().split("\n")
    print(lines[-2].split("\r")[-1])
    return elapsed, int(lines[-1].split()[1]) * 1024  # VmHWM is in kB


def interpreter_start() -> float:
    """Wall seconds to start Python and import the pruner: a fixed cost the copy baseline does not pay."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import easyep_sglang.checkpoint.prune"], cwd=ROOT, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="synthetic checkpoint size")
    parser.add_argument("--keep", type=float, default=0.5, help="share of each MoE layer's experts kept")
    parser.add_argument("--shard-gb", type=float, default=0.5, help="shard size of the synthetic checkpoint")
    parser.add_argument("--tmp-dir", default="/tmp", help="where the checkpoint and its copies are written")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender; the best time is kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="easyep-prune-bench-", dir=args.tmp_dir))
    try:
        model, out = work / "model", work / "pruned"
        config = build_checkpoint(model, args.size_gb, args.shard_gb, np.random.default_rng(args.seed))
        mask = random_mask(config, args.keep, args.seed)
        mask.save(work / "mask.json")
        headers = read_checkpoint(model)[1]
        source_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        largest = max(t.nbytes for h in headers.values() for t in h.tensors.values())
        os.sync()
        for shard in model.glob("*.safetensors"):  # both contenders read from the page cache
            shard.read_bytes()
        copy_plain, copy, runs, starts = [], [], [], []
        for attempt in range(args.repeat):  # interleaved, best of each: the machine may be shared
            if attempt:
                shutil.rmtree(out)
                os.sync()
            copy_plain.append(copy_all(model, work / "copy", fsync=False))
            copy.append(copy_all(model, work / "copy", fsync=True))
            runs.append(run_pruner(model, work / "mask.json", out))
            starts.append(interpreter_start())
        copy_plain_s, copy_s, prune_s = min(copy_plain), min(copy), min(t for t, _ in runs)
        peak_rss = max(rss for _, rss in runs)
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        index_total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        ideal = ideal_bytes(model, mask.resolve(spec_from_config(config)))

        copy_rate, prune_rate = source_bytes / copy_s, out_bytes / prune_s
        print(f"checkpoint: {source_bytes / 1e9:.2f} GB in {len(headers)} shards, {config['num_hidden_layers'] - 1} "
              f"MoE layers x {EXPERTS} experts, keep {args.keep:.0%}; largest tensor {largest / MiB:.1f} MiB")
        print(f"copy   shutil.copyfile+fsync: {source_bytes / 1e9:.2f} GB in {copy_s:.2f} s = "
              f"{copy_rate / 1e9:.2f} GB/s"
              f"  (without fsync: {source_bytes / copy_plain_s / 1e9:.2f} GB/s)")
        print(f"prune  subprocess wall time:  {out_bytes / 1e9:.2f} GB in {prune_s:.2f} s = "
              f"{prune_rate / 1e9:.2f} GB/s")
        print(f"throughput prune/copy = {prune_rate / copy_rate:.2f}   (goal >= 0.8; best of {args.repeat}); without "
              f"the {min(starts):.2f} s interpreter start: {out_bytes / (prune_s - min(starts)) / copy_rate:.2f}; "
              f"against copyfile without fsync: {prune_rate * copy_plain_s / source_bytes:.2f}")
        print(f"peak RSS {peak_rss / MiB:.1f} MiB / largest tensor {largest / MiB:.1f} MiB = {peak_rss / largest:.2f}"
              f"   (goal <= 1.5)")
        print(f"pruned tensor bytes / ideal = {index_total} / {ideal} = {index_total / ideal:.6f}   (goal 1.000); "
              f"file overhead (headers) {out_bytes - index_total} bytes")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
