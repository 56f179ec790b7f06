"""Offline pruner: rewrite a Hugging Face safetensors checkpoint keeping only a mask's experts.

    python -m easyep_sglang.prune --model-path ORIG --mask mask.json --out PRUNED [--force]

Kept experts are renumbered 0..n-1 in order of original id; router rows (`mlp.gate.*`, including the
DeepSeek-V3 `e_score_correction_bias`) are sliced to the kept ids in the same order. Bytes are copied,
never decoded, so FP8 weights and their `weight_scale_inv` stay bit-identical. Layers the mask does not
name (dense layers, MTP/next-n layers, shared experts) are copied unchanged; an MTP layer the mask names is
pruned like a MoE layer, and only into a stock-exact checkpoint (pruned_checkpoint.check_pruned_mtp).

config.json gets an `easyep` block, written by easyep_sglang.checkpoint.pruned_checkpoint (see there: expert counts,
stock_engine exact | approximate | plugin-only).
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from easyep_sglang import __version__
from easyep_sglang.checkpoint import tensor_names
from easyep_sglang.core.fileio import publish_directory, staging_leftovers
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.checkpoint.safetensors_stream import (
                                                         INDEX_NAME, Header, OutTensor, TensorInfo, ranges_digest, read_checkpoint, read_header, write_shard,
                                                         )
from easyep_sglang.checkpoint.pruned_checkpoint import EXPERT_COUNT_KEYS, STOCK_NOTES, mtp_note, pruned_config
from easyep_sglang.core.spec import load_config, spec_from_config

PROVENANCE_NAME = "easyep_prune.json"
# Weights in other formats would ship unpruned beside the pruned safetensors: never copied.
SKIPPED_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json",
                 "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack")



class PruneError(ValueError):
    """A checkpoint or output that cannot be pruned as asked; the message names the fix."""


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    source: Header
    tensors: tuple[OutTensor, ...]


# ---- planning (pure) ------------------------------------------------------------------------------
def plan_tensor(name: str, info: TensorInfo, kept: dict[int, tuple[int, ...]], n_experts: int) -> OutTensor | None:
    """The output tensor for one source tensor: renamed, row-sliced, unchanged, or None when pruned."""
    whole = OutTensor(name, info.dtype, info.shape, ((info.begin, info.nbytes),))
    if expert := tensor_names.expert_tensor(name):
        if expert.layer not in kept:
            return whole
        if expert.expert >= n_experts:
            raise PruneError(f"{name}: expert id >= n_experts={n_experts} of config.json; config and weights disagree")
        ids = kept[expert.layer]
        if expert.expert not in ids:
            return None
        return OutTensor(expert.renumbered(ids.index(expert.expert)), info.dtype, info.shape, whole.ranges)
    if (layer := tensor_names.expert_rows_layer(name)) in kept:
        if not info.shape or info.shape[0] != n_experts or info.nbytes % n_experts:
            raise PruneError(f"{name} has shape {list(info.shape)}, not [{n_experts}, ...]; "
                             f"this layout is not supported")
        rows = kept[layer]
        return OutTensor(name, info.dtype, (len(rows),) + info.shape[1:], info.row_ranges(rows))
    return whole


def plan_prune(headers: dict[str, Header], kept: dict[int, tuple[int, ...]], n_experts: int) -> list[ShardPlan]:
    """One output shard per source shard that keeps any tensor, tensors in source byte order."""
    plans, experts_seen, routers_seen = [], set(), set()
    for filename, header in headers.items():
        tensors = []
        for name, info in header.tensors.items():
            if expert := tensor_names.expert_tensor(name):
                experts_seen.add((expert.layer, expert.expert))
            elif (layer := tensor_names.router_layer(name)) is not None:
                routers_seen.add(layer)
            if (t := plan_tensor(name, info, kept, n_experts)) is not None:
                tensors.append(t)
        if tensors:
            plans.append(ShardPlan(filename, header, tuple(tensors)))
    for layer, ids in kept.items():
        if layer not in routers_seen:
            raise PruneError(f"layer {layer} has no router tensor 'layers.{layer}.mlp.gate.*' in the checkpoint; "
                             f"is its layout supported (DeepSeek-V2/V3, Qwen2/3-MoE)?")
        missing = [e for e in ids if (layer, e) not in experts_seen]
        if missing and len(missing) < len(ids):  # all missing = fused [E, ...] expert tensors, sliced by rows
            raise PruneError(f"layer {layer}: the checkpoint has no tensors for kept experts {missing}; re-download it")
    return plans


# ---- checkpoint I/O --------------------------------------------------------------------------------
def extra_files(model: Path, shard_names) -> tuple[list[Path], list[Path]]:
    """(files to copy as they are, weight files in other formats that are skipped), relative to `model`."""
    copy, skipped = [], []
    for root, dirs, files in os.walk(model):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .cache, .huggingface
        for f in sorted(files):
            rel = Path(root, f).relative_to(model)
            if str(rel) in ("config.json", INDEX_NAME, PROVENANCE_NAME, *shard_names):
                continue  # rewritten
            (skipped if any(fnmatch.fnmatch(f, p) for p in SKIPPED_FILES) else copy).append(rel)
    return copy, skipped


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _verify(out: Path, plans: list[ShardPlan], sharded: bool, n_bytes_checks: int) -> None:
    """Re-read what was written: shard headers and the index against the plan, then N tensors' bytes."""
    weight_map = json.loads((out / INDEX_NAME).read_text())["weight_map"] if sharded else {}
    for plan in plans:
        written = read_header(out / plan.filename)
        got = [(name, t.dtype, t.shape) for name, t in written.tensors.items()]
        want = [(t.name, t.dtype, t.shape) for t in plan.tensors]
        if got != want or (sharded and any(weight_map.get(t.name) != plan.filename for t in plan.tensors)):
            raise PruneError(f"verification of {out / plan.filename} failed; is the output disk healthy?")
    if sharded and len(weight_map) != sum(len(plan.tensors) for plan in plans):
        raise PruneError(f"verification of {out / INDEX_NAME} failed; is the output disk healthy?")
    pairs = [(plan, t) for plan in plans for t in plan.tensors]
    for plan, t in random.Random(0).sample(pairs, min(n_bytes_checks, len(pairs))):
        info = read_header(out / plan.filename).tensors[t.name]
        written = ranges_digest(out / plan.filename, ((info.begin, info.nbytes),))
        if written != ranges_digest(plan.source.path, t.ranges):
            raise PruneError(f"verification failed: the bytes of {t.name} differ from the source")


# ---- the command -----------------------------------------------------------------------------------
def prune_checkpoint(model_path: str | Path, mask_path: str | Path, out: str | Path, force: bool = False,
                     verify_bytes: int = 0) -> Path:
    model, out = Path(model_path).resolve(), Path(out).resolve()
    config = load_config(model)
    if (config.get("easyep") or {}).get("stock_engine") == "plugin-only":
        raise PruneError(f"{model} is already pruned with per-layer expert counts; prune the original checkpoint")
    spec = spec_from_config(config)
    mask = ExpertMask.load(mask_path)
    kept = mask.resolve(spec)
    if out == model or model in out.parents or out in model.parents:
        raise PruneError(f"--out {out} overlaps --model-path {model}; write the pruned model elsewhere")
    if out.exists() and not out.is_dir():
        raise PruneError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and not force:
        raise PruneError(f"{out} already exists; pass --force to replace it, or choose another --out")
    index, headers = read_checkpoint(model)
    plans = plan_prune(headers, kept, spec.n_experts)
    new_config = pruned_config(config, spec, kept, mask.digest())
    copies, skipped = extra_files(model, headers)
    total = sum(t.nbytes for plan in plans for t in plan.tensors)
    needed = total + sum((model / f).stat().st_size + 4096 for f in copies) + 4096 * (len(plans) + 3)
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if shutil.disk_usage(existing).free < needed:
        raise PruneError(f"not enough space on the device holding {existing}: the pruned model needs "
                         f"{_size(needed)}; free space there or choose another --out")
    for stale in staging_leftovers(out):
        _log(f"leftover {stale} from an interrupted run; remove it to free space")
    try:
        with publish_directory(out) as tmp:
            _write_all(tmp, model, plans, index, new_config, copies, verify_bytes)
            provenance = _provenance(model, mask_path, mask, spec, config, new_config, kept, headers, total)
            _write_json(tmp / PROVENANCE_NAME, provenance)
            _fsync_tree(tmp)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PruneError(f"no space left on the device holding {out.parent}: the pruned model needs "
                             f"{_size(needed)}; free space there or choose another --out") from None
        raise
    block = new_config["easyep"]
    source_total = sum(t.nbytes for h in headers.values() for t in h.tensors.values())
    _log(f"wrote {out}: {_size(total)} of {_size(source_total)} of tensors, {len(kept)} layers pruned; stock engine: "
         f"{block['stock_engine']} ({spec.experts_config_key}={new_config[spec.experts_config_key]}"
         + (f", n_group={new_config['n_group']}, topk_group={new_config['topk_group']})" if spec.n_group > 1 else ")")
         + STOCK_NOTES[block["stock_engine"]] + mtp_note(spec, kept))
    if skipped:
        _log(f"not copied (weights in another format, they would be unpruned): {', '.join(map(str, skipped))}")
    return out


def _write_all(tmp: Path, model: Path, plans: list[ShardPlan], index: dict | None, new_config: dict,
               copies: list[Path], verify_bytes: int) -> None:
    total = sum(t.nbytes for plan in plans for t in plan.tensors)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="easyep prune", mininterval=0.5) as bar:
        for plan in plans:
            (tmp / plan.filename).parent.mkdir(parents=True, exist_ok=True)
            write_shard(tmp / plan.filename, plan.source.path, list(plan.tensors), plan.source.metadata, bar.update)
    weight_map = {t.name: plan.filename for plan in plans for t in plan.tensors}
    if index is not None:
        metadata = {**(index.get("metadata") or {}), "total_size": total}
        _write_json(tmp / INDEX_NAME, {**index, "metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})
    _write_json(tmp / "config.json", new_config)
    for rel in copies:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(model / rel, tmp / rel)
    _verify(tmp, plans, index is not None, verify_bytes)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` before it is published: once, at the end, so the kernel's
    own writeback overlaps the copying instead of waiting shard by shard."""
    for folder, _, files in os.walk(root, topdown=False):
        for path in [*(Path(folder, f) for f in files), Path(folder)]:
            _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _provenance(model, mask_path, mask, spec, config, new_config, kept, headers, total) -> dict:
    changed = [k for k in (*EXPERT_COUNT_KEYS, "n_group", "topk_group") if k in config and config[k] != new_config[k]]
    return {
        "format": "easyep-prune-provenance", "version": 1,
        "tool": {"name": "easyep_sglang.prune", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"path": str(model), "architecture": spec.architecture, "fingerprint": spec.fingerprint,
                   "tensor_bytes": sum(t.nbytes for h in headers.values() for t in h.tensors.values())},
        "mask": {"path": str(Path(mask_path).resolve()), "digest": mask.digest(), "method": mask.method,
                 "provenance": mask.provenance},
        "stock_engine": new_config["easyep"]["stock_engine"],
        "config_changes": {k: [config[k], new_config[k]] for k in changed},
        "output_tensor_bytes": total,
        "kept": {str(l): list(ids) for l, ids in sorted(kept.items())},  # original expert ids, in new-id order
    }


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def _log(message: str) -> None:
    print(f"easyep: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easyep_sglang.prune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True, help="local Hugging Face model directory (safetensors)")
    parser.add_argument("--mask", required=True, help="expert mask JSON for this model")
    parser.add_argument("--out", required=True, help="directory for the pruned model; must not exist")
    parser.add_argument("--force", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--verify-bytes", type=int, default=0, metavar="N",
                        help="after writing, compare N randomly chosen tensors byte for byte with the source")
    args = parser.parse_args(argv)
    try:
        prune_checkpoint(args.model_path, args.mask, args.out, force=args.force, verify_bytes=args.verify_bytes)
    except KeyboardInterrupt:
        print("easyep prune: interrupted; no output written", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:  # MaskError, PruneError and SafetensorsError are ValueErrors
        print(f"easyep prune: error: {err}", file=sys.stderr)
        return 1
    return 0
