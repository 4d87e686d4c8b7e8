#!/usr/bin/env bash
# Starts lossd on a free loopback port, runs the Python demo client against it, stops it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${LOSSD_BINARY:-$ROOT/build/server/lossd}
PY=${PYTHON:-$ROOT/.venv/bin/python}
LOG=$(mktemp)
"$BIN" --host 127.0.0.1 --port 0 --device cpu 2>"$LOG" &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
PORT=""
for _ in $(seq 1 100); do
  PORT=$(sed -n 's/^lossd listening on .*:\([0-9]*\)$/\1/p' "$LOG" | head -1)
  [ -n "$PORT" ] && break
  kill -0 $PID 2>/dev/null || { cat "$LOG"; echo "lossd exited during startup" >&2; exit 1; }
  sleep 0.1
done
[ -n "$PORT" ] || { cat "$LOG"; echo "lossd did not start in 10 s" >&2; exit 1; }
echo "lossd (pid $PID) listening on 127.0.0.1:$PORT"
"$PY" "$ROOT/client/python/examples/demo.py" --target "127.0.0.1:$PORT"
