"""The test servers' names, and what each serves.

Names are `kind:target`:
  plain:MODEL    no mask                                  mask:MASK      the mask's model with --mask
  prune:MASK     --mask --prune                           offline:MASK   the offline-pruned checkpoint of MASK
  tp2:MASK       --mask --tp-size 2                       nodes2:MASK    --mask --tp-size 2 over two nodes (loopback)
  dp2:MASK       --mask --dp-size 2 (two replicas under SGLang's DP controller)
plain, mask, tp2 and nodes2 servers also record calibration statistics (--record-stats) into `server.stats_dir`.
A "+fusion" suffix adds --enforce-shared-experts-fusion (DeepSeek's shared expert fused into the routed
experts, SGLang's default on GPUs).
MODEL is "ARCH/fp32", "ARCH/bf16" (tiny models from easyep_sglang.demo.tiny_models) or "demo" (the
shipped demo MoE); MASK is "ARCH/NAME" from MASKS, on the tiny model in MASKED_DTYPE (float32 unless named
there). Every server of a tiny model gets MODEL_ARGS[ARCH], and every server records routing choices with SGLang's expert-distribution recorder into
`server.recorder_dir`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


# Tiny DeepSeek-V3: 16 experts in 4 groups of 4, top-4 of 2 groups. Tiny Qwen3-MoE: 16 experts, top-4, softmax.
MASKS = {
    # whole groups in every layer, the same count: an offline-pruned checkpoint is exact in stock engines
    "deepseek_v3/whole": {1: [0, 1, 2, 3, 8, 9, 10, 11], 2: [4, 5, 6, 7, 12, 13, 14, 15]},
    # counts differ per layer, groups split (layer 2: groups 2 and 3 keep one expert each, so they are unreachable)
    "deepseek_v3/varying": {1: [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14], 2: [0, 1, 4, 5, 8, 12]},
    "qwen3_moe/varying": {0: list(range(12)), 1: [1, 4, 6, 9, 11, 15], 2: list(range(3, 13))},
    # layer 1 keeps whole groups 0 and 2, layer 2 two experts of every group
    "deepseek_v3/tp2": {1: [0, 1, 2, 3, 8, 9, 10, 11], 2: [0, 1, 4, 5, 8, 9, 12, 13]},
    "deepseek_v3/all": "all",
    "qwen3_moe/all": "all",
    # deepseek_v3/whole, and the MTP layer 3 keeps 2 whole groups too: exact, stock SGLang's NextN draft loads it
    "deepseek_v3_mtp/whole": {1: [0, 1, 2, 3, 8, 9, 10, 11], 2: [4, 5, 6, 7, 12, 13, 14, 15],
                              3: [0, 1, 2, 3, 12, 13, 14, 15]},
    # deepseek_v3/varying on the FP8 model (R1's layout)
    "deepseek_v3_fp8/varying": {1: [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14], 2: [0, 1, 4, 5, 8, 12]},
}
# Tiny-model variants: ARCH -> (demo_model arch, its command-line flags). deepseek_v3_mtp adds a next-n (MTP)
# layer 3 to deepseek_v3, whose layers 0-2 it keeps bit for bit. deepseek_v3_fp8 is DeepSeek-R1's FP8 release layout
# (demo_model --fp8: wider, so its blocks are whole, with an MTP layer), served as "deepseek_v3_fp8/bf16": SGLang
# serves FP8 with bf16 or fp16 activations only (model_loader/loader.py:268).
VARIANTS = {"deepseek_v3_mtp": ("deepseek_v3", ("--mtp-layers", "1")),
            "deepseek_v3_fp8": ("deepseek_v3", ("--fp8", "--mtp-layers", "1"))}
# Flags every server of a tiny model gets: DeepSeek prefills in chunks of 16 tokens with the prefix cache on,
# Qwen in one chunk with the cache off, so calibration (and everything else) is checked under both.
MODEL_ARGS = {"deepseek_v3": ("--chunked-prefill-size", "16"), "qwen3_moe": ("--disable-radix-cache",)}
MODEL_ARGS.update({variant: MODEL_ARGS[arch] for variant, (arch, _) in VARIANTS.items()})
MASKED_DTYPE = {"deepseek_v3_fp8": "bf16"}  # the served dtype of an ARCH's masked servers, when not fp32
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ServerSpec:
    model: str  # "ARCH/DTYPE", "demo", or "offline/MASK"
    mask: str | None = None
    args: tuple[str, ...] = ()
    record_stats: bool = False
    nnodes: int = 1  # >1: LoopbackNodes, one launcher per node

    @property
    def weight(self) -> int:
        """Memory and cores it takes, in servers: its schedulers (TP x DP)."""
        def size(flag):
            return int(self.args[self.args.index(flag) + 1]) if flag in self.args else 1
        return size("--tp-size") * size("--dp-size")


def server_spec(name: str) -> ServerSpec:
    base, fusion, _ = name.partition("+fusion")
    spec = _server_spec(base)
    return dataclasses.replace(spec, args=(*spec.args, "--enforce-shared-experts-fusion")) if fusion else spec


def _server_spec(name: str) -> ServerSpec:
    kind, _, target = name.partition(":")
    if kind == "plain":  # also records statistics: the calibration tests and the unmasked references share it
        if target == "demo":
            return ServerSpec(target, record_stats=True)
        arch, dtype = target.split("/")
        return ServerSpec(target, args=("--dtype", DTYPES[dtype], *MODEL_ARGS[arch]), record_stats=True)
    if target not in MASKS:
        raise KeyError(f"unknown test mask {target!r}; known: {', '.join(MASKS)}")
    arch = target.split("/")[0]
    model = masked_model(arch)
    args = ("--dtype", DTYPES[model.split("/")[1]], *MODEL_ARGS[arch])
    return {
        "mask": ServerSpec(model, target, args, record_stats=True),
        "prune": ServerSpec(model, target, (*args, "--prune")),
        "offline": ServerSpec(f"offline/{target}", None, args),
        "tp2": ServerSpec(model, target, (*args, "--tp-size", "2"), record_stats=True),
        "nodes2": ServerSpec(model, target, (*args, "--tp-size", "2"), record_stats=True, nnodes=2),
        "dp2": ServerSpec(model, target, (*args, "--dp-size", "2")),
    }[kind]


def masked_model(arch: str) -> str:
    """The MODEL the masks of `arch` apply to."""
    return f"{arch}/{MASKED_DTYPE.get(arch, 'fp32')}"
