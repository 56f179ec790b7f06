#!/usr/bin/env bash
# DeepSeek-R1 / V3 (FP8, 256 experts) on one 8xH200 node (141 GB each).
# NOT RUN HERE: written for a GPU node; the development machine has no GPU.
#
#   MODEL=/models/DeepSeek-R1 MASK=/masks/r1-math-128.json launch/deepseek_r1_8xh200.sh [mask|pruned] [FLAGS...]
#   FLAGS go to the launcher after the recipe's own (e.g. --dry-run: check everything, print the command, start nothing).
#
# mask    the full checkpoint (673 GB served) fits on 8xH200; masked experts are loaded but never routed
#         to. No checkpoint copy: the quickest way to try a mask.
# pruned  an offline-pruned copy (python -m easyep_sglang.prune, made once, kept beside the model). With
#         128 of 256 experts it serves 346 GB, and the memory it frees becomes KV cache.
set -euo pipefail
MODE=${1:-mask}
: "${MODEL:?set MODEL to the DeepSeek-R1/V3 checkpoint directory}"
: "${MASK:?set MASK to an expert mask JSON made for this model}"
PORT=${PORT:-30000}
PYTHON=${PYTHON:-python3}
SERVE=(--tp 8 --host 0.0.0.0 --port "$PORT")

case "$MODE" in
  mask)
    "$PYTHON" -m easyep_sglang.plan --model-path "$MODEL" --gpus 8 --gpu-mem 141GB
    exec "$PYTHON" -m easyep_sglang.launch --model-path "$MODEL" --mask "$MASK" "${SERVE[@]}" "${@:2}" ;;
  pruned)
    "$PYTHON" -m easyep_sglang.plan --model-path "$MODEL" --mask "$MASK" --gpus 8 --gpu-mem 141GB
    PRUNED=${PRUNED:-$MODEL-easyep-$(basename "$MASK" .json)}
    [ -f "$PRUNED/config.json" ] || "$PYTHON" -m easyep_sglang.prune --model-path "$MODEL" --mask "$MASK" --out "$PRUNED"
    exec "$PYTHON" -m easyep_sglang.launch --model-path "$PRUNED" "${SERVE[@]}" "${@:2}" ;;
  *) echo "usage: $0 [mask|pruned]" >&2; exit 2 ;;
esac
