#!/usr/bin/env bash
# CPU demo: a tiny random DeepSeek-V3 served by SGLang on this machine's CPU, with an expert mask.
# Runs here (tests/test_recipes.py runs it). It builds the model, checks the bundled mask against it,
# starts our launcher, asks one question, prints the reply and stops the server it started.
#
#   launch/cpu_demo.sh [WORKDIR]        # PYTHON=.venv/bin/python PORT=30000 to override
set -euo pipefail
PYTHON=${PYTHON:-python3}
WORK=${1:-$(mktemp -d -t easyep-cpu-demo.XXXXXX)}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
MODEL="$WORK/tiny-deepseek-v3"
MASK=$("$PYTHON" -c 'import easyep_sglang, pathlib; print(pathlib.Path(easyep_sglang.__file__).parent / "data" / "demo_mask_deepseek_v3.json")')
URL="http://127.0.0.1:$PORT"

[ -f "$MODEL/config.json" ] || "$PYTHON" -m easyep_sglang.demo_model --arch deepseek_v3 --out "$MODEL"
"$PYTHON" -m easyep_sglang.mask check "$MASK" --model-path "$MODEL"

# Own session, so the whole server (scheduler and detokenizer too) is stopped by its process group.
HF_HUB_OFFLINE=1 setsid "$PYTHON" -m easyep_sglang.launch --model-path "$MODEL" --mask "$MASK" \
  --host 127.0.0.1 --port "$PORT" --mem-fraction-static 0.2 >"$WORK/server.log" 2>&1 &
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
curl -sf "$URL/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "'"$MODEL"'", "messages": [{"role": "user", "content": "What is 37 + 48?"}], "max_tokens": 16, "temperature": 0}' \
  | "$PYTHON" -c 'import json, sys; print("easyep demo: reply:", repr(json.load(sys.stdin)["choices"][0]["message"]["content"]))'
