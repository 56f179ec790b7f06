#!/usr/bin/env bash
# DeepSeek-R1 / V3 (FP8, 256 experts) on one 8xH100 node (80 GB each).
# NOT RUN HERE: written for a GPU node; the development machine has no GPU.
#
#   MODEL=/models/DeepSeek-R1 MASK=/masks/r1-math-128.json launch/deepseek_r1_8xh100.sh [prune-load|pruned] [FLAGS...]
#   FLAGS go to the launcher after the recipe's own (e.g. --dry-run: check everything, print the command, start nothing).
#
# The full model (673 GB) does not fit in 8 x 80 GB, so a plain --mask cannot start here; the pruned
# experts must never be allocated. With 128 of 256 experts it serves 346 GB (python -m easyep_sglang.plan).
# prune-load  the original checkpoint, --mask M --prune: only the kept experts are built and loaded.
# pruned      an offline-pruned copy (python -m easyep_sglang.prune, made once, kept beside the model).
set -euo pipefail
MODE=${1:-prune-load}
: "${MODEL:?set MODEL to the DeepSeek-R1/V3 checkpoint directory}"
: "${MASK:?set MASK to an expert mask JSON made for this model}"
PORT=${PORT:-30000}
PYTHON=${PYTHON:-python3}
SERVE=(--tp 8 --host 0.0.0.0 --port "$PORT")

"$PYTHON" -m easyep_sglang.plan --model-path "$MODEL" --mask "$MASK" --gpus 8 --gpu-mem 80GiB
case "$MODE" in
  prune-load)
    exec "$PYTHON" -m easyep_sglang.launch --model-path "$MODEL" --mask "$MASK" --prune "${SERVE[@]}" "${@:2}" ;;
  pruned)
    PRUNED=${PRUNED:-$MODEL-easyep-$(basename "$MASK" .json)}
    [ -f "$PRUNED/config.json" ] || "$PYTHON" -m easyep_sglang.prune --model-path "$MODEL" --mask "$MASK" --out "$PRUNED"
    exec "$PYTHON" -m easyep_sglang.launch --model-path "$PRUNED" "${SERVE[@]}" "${@:2}" ;;
  *) echo "usage: $0 [prune-load|pruned]" >&2; exit 2 ;;
esac
