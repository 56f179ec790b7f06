#!/usr/bin/env bash
# DeepSeek-R1 / V3 (FP8, 256 experts): throughput on the same two 8-GPU nodes (80 GB GPUs) before and after
# pruning, the setup of the EASY-EP paper's Figures 1 and 6, measured with replicas rather than doubled.
# NOT RUN HERE: written for two GPU nodes; the development machine has no GPU.
#
#   MODEL=/models/DeepSeek-R1 MASK=/masks/r1-math-128.json HEAD=10.0.0.1 NODE1=10.0.0.2 \
#     launch/deepseek_r1_same_hardware.sh STEP [FLAGS...]
#   FLAGS go to the launcher (serve-*) or to python -m bench.sweep (plan, bench-*) after the recipe's own.
#
# The full model (673 GB) needs both nodes: TP=16 across them. With 128 of 256 experts (346 GB) one node holds
# it, so the same 16 GPUs hold two TP=8 replicas, one per node. Steps, for each round (ROUND=0, 1, 2):
#   plan          anywhere: the shape of each configuration on 16 x GPU_MEM, and its server flags (starts nothing)
#   serve-full    on both nodes (NODE_RANK=0 on HEAD, 1 on NODE1): the full model, TP=16 over the two nodes
#   bench-full    on HEAD while serve-full runs: 1K/4K in x 1K/4K out, concurrency 32
#   serve-pruned  on both nodes: the offline-pruned copy (made once per node if missing), TP=8, one replica each
#   bench-pruned  on HEAD while serve-pruned runs on both nodes: the 32 requests dealt over the two replicas
#   bench-alone   on HEAD while serve-pruned runs on HEAD only: one replica on its own, the part replicas multiply
# Every bench step appends rows to $OUT/sweep.jsonl under one sweep id ($SWEEP_ID), paired by round, and
# renders $OUT/sweep.md and sweep.png (python -m bench.sweep.report $OUT/sweep.jsonl renders them again).
set -euo pipefail
STEP=${1:-plan}
: "${MODEL:?set MODEL to the DeepSeek-R1/V3 checkpoint directory}"
: "${MASK:?set MASK to an expert mask JSON made for this model}"
ROOT=$(cd "$(dirname "$0")/.." && pwd)  # bench/ is not installed: run it from the repository
PYTHON=${PYTHON:-python3}
PORT=${PORT:-30000}
GPU_MEM=${GPU_MEM:-80GB}
PRUNED=${PRUNED:-$MODEL-easyep-$(basename "$MASK" .json)}
OUT=${OUT:-$ROOT/runs/r1-same-hardware}
SWEEP=(--model-path "$MODEL" --mask-file "$MASK" --same-hardware 16 --device-memory "$GPU_MEM" --rounds 1
       --first-round "${ROUND:-0}" --sweep-id "${SWEEP_ID:-r1-same-hardware}" --out-dir "$OUT")
sweep() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m bench.sweep "${SWEEP[@]}" "$@"; }
head_url() { : "${HEAD:?set HEAD to node 0 address}"; echo "http://$HEAD:$PORT"; }

case "$STEP" in
  plan)
    sweep --modes full prune_offline --dry-run "${@:2}" ;;
  serve-full)
    : "${NODE_RANK:?set NODE_RANK: 0 on HEAD, 1 on NODE1}"
    exec "$PYTHON" -m easyep_sglang.launch --model-path "$MODEL" --tp 16 --nnodes 2 --node-rank "$NODE_RANK" \
      --dist-init-addr "${HEAD:?set HEAD to node 0 address}:${DIST_PORT:-5000}" --host 0.0.0.0 --port "$PORT" "${@:2}" ;;
  serve-pruned)
    [ -f "$PRUNED/config.json" ] || "$PYTHON" -m easyep_sglang.prune --model-path "$MODEL" --mask "$MASK" --out "$PRUNED"
    exec "$PYTHON" -m easyep_sglang.launch --model-path "$PRUNED" --tp 8 --host 0.0.0.0 --port "$PORT" "${@:2}" ;;
  bench-full)
    sweep --modes full --base-url "$(head_url)" "${@:2}" ;;
  bench-pruned)
    sweep --modes prune_offline --base-url "$(head_url)" "http://${NODE1:?set NODE1 to node 1 address}:$PORT" "${@:2}" ;;
  bench-alone)
    sweep --modes prune_offline --base-url "$(head_url)" "${@:2}" ;;
  *) echo "usage: $0 [plan|serve-full|bench-full|serve-pruned|bench-pruned|bench-alone]" >&2; exit 2 ;;
esac
