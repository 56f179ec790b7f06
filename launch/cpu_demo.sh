#!/usr/bin/env bash
# CPU demo: the trained demo MoE served by SGLang on this machine's CPU, with its bundled math mask.
# Runs here (tests/test_recipes.py runs it). It checks the mask against the model, starts the server
# of `make serve` (python -m easyep_sglang.demo), asks one sum, prints the reply and stops the server.
#
#   launch/cpu_demo.sh [WORKDIR]        # PYTHON=.venv/bin/python PORT=30000 to override
set -euo pipefail
PYTHON=${PYTHON:-python3}
WORK=${1:-$(mktemp -d -t easyep-cpu-demo.XXXXXX)}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
MODEL=$("$PYTHON" -c 'from easyep_sglang.demo.server import DEMO_MODEL; print(DEMO_MODEL)')
MASK=$("$PYTHON" -c 'from easyep_sglang.demo.server import DEMO_MASK; print(DEMO_MASK)')
URL="http://127.0.0.1:$PORT"
mkdir -p "$WORK"

"$PYTHON" -m easyep_sglang.mask check "$MASK" --model-path "$MODEL"

# Own session, so the whole server (scheduler and detokenizer too) is stopped by its process group.
HF_HUB_OFFLINE=1 setsid "$PYTHON" -m easyep_sglang.demo --host 127.0.0.1 --port "$PORT" \
  --mem-fraction-static 0.2 >"$WORK/server.log" 2>&1 &
SERVER=$!
disown "$SERVER"  # SGLang ends its own shutdown with SIGKILL; no "Killed" job notice
stop() {
  kill -TERM -- "-$SERVER" 2>/dev/null || return 0
  for _ in $(seq 30); do kill -0 -- "-$SERVER" 2>/dev/null || return 0; sleep 1; done
  kill -KILL -- "-$SERVER" 2>/dev/null || true
}
trap stop EXIT

for _ in $(seq 600); do
  curl -sf "$URL/health" >/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { tail -20 "$WORK/server.log" >&2; echo "easyep demo: server exited" >&2; exit 1; }
  sleep 1
done
curl -sf "$URL/health" >/dev/null || { echo "easyep demo: server not healthy after 600 s; see $WORK/server.log" >&2; exit 1; }

echo "easyep demo: serving $MODEL with $MASK at $URL"
curl -sf "$URL/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "easyep-demo", "prompt": "Q: 37+48=? A:", "max_tokens": 8, "stop": "\n", "temperature": 0}' \
  | "$PYTHON" -c 'import json, sys; print("easyep demo: Q: 37+48=? A:" + json.load(sys.stdin)["choices"][0]["text"])'
