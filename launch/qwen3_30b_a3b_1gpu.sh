#!/usr/bin/env bash
# Qwen3-30B-A3B (bf16, 128 experts, top-8) on one GPU.
# NOT RUN HERE: written for a GPU machine; the development machine has no GPU.
#
#   MODEL=/models/Qwen3-30B-A3B MASK=/masks/qwen3-math-64.json launch/qwen3_30b_a3b_1gpu.sh [mask|prune-load|pruned] [FLAGS...]
#   FLAGS go to the launcher after the recipe's own (e.g. --dry-run: check everything, print the command, start nothing).
#
# mask        all experts loaded (~61 GB: an 80 GB GPU), masked ones never routed to.
# prune-load  --mask M --prune: only kept experts allocated (64 of 128: ~32 GB, so a 48 GB GPU serves it).
# pruned      an offline-pruned copy (python -m easyep_sglang.prune, made once, kept beside the model).
set -euo pipefail
MODE=${1:-mask}
: "${MODEL:?set MODEL to the Qwen3-30B-A3B checkpoint directory}"
: "${MASK:?set MASK to an expert mask JSON made for this model}"
PORT=${PORT:-30000}
PYTHON=${PYTHON:-python3}
GPU_MEM=${GPU_MEM:-80GiB}
SERVE=(--tp 1 --host 0.0.0.0 --port "$PORT")

"$PYTHON" -m easyep_sglang.plan --model-path "$MODEL" --mask "$MASK" --gpus 1 --gpu-mem "$GPU_MEM" --min-kv-tokens 8192
case "$MODE" in
  mask) exec "$PYTHON" -m easyep_sglang.launch --model-path "$MODEL" --mask "$MASK" "${SERVE[@]}" "${@:2}" ;;
  prune-load) exec "$PYTHON" -m easyep_sglang.launch --model-path "$MODEL" --mask "$MASK" --prune "${SERVE[@]}" "${@:2}" ;;
  pruned)
    PRUNED=${PRUNED:-$MODEL-easyep-$(basename "$MASK" .json)}
    [ -f "$PRUNED/config.json" ] || "$PYTHON" -m easyep_sglang.prune --model-path "$MODEL" --mask "$MASK" --out "$PRUNED"
    exec "$PYTHON" -m easyep_sglang.launch --model-path "$PRUNED" "${SERVE[@]}" "${@:2}" ;;
  *) echo "usage: $0 [mask|prune-load|pruned]" >&2; exit 2 ;;
esac
