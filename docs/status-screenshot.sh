#!/usr/bin/env bash
# Makes docs/status.png: the README's proxy with its status page (`--status`), over four small
# backends (one slow, one failing 60 % of its requests, so outlier detection ejects it) and an
# address nothing listens on (marked down), after some traffic, a drain and a re-weight.
# Needs python3, curl and Debian's chromium (`apt-get install chromium`); CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --example reverse_proxy
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
python3 docs/status-backend.py 3001 0.004 0 & pids+=($!)
python3 docs/status-backend.py 3002 0.012 0 & pids+=($!)
python3 docs/status-backend.py 3003 0.006 0 & pids+=($!)
python3 docs/status-backend.py 3005 0.003 0.6 & pids+=($!)
target/debug/examples/reverse_proxy --listen 127.0.0.1:8088 --status 127.0.0.1:9000 \
    --backends 127.0.0.1:3001,127.0.0.1:3002,127.0.0.1:3003,127.0.0.1:3004,127.0.0.1:3005 \
    >/dev/null 2>&1 & pids+=($!)
sleep 2
for i in $(seq 1 400); do curl -s -o /dev/null "http://127.0.0.1:8088/p$i"; done
curl -s -X POST -d 'pool=backends&endpoint=127.0.0.1:3002' http://127.0.0.1:9000/status/drain
curl -s -X POST -d 'pool=backends&endpoint=127.0.0.1:3003&weight=3' http://127.0.0.1:9000/status/weight
for i in $(seq 1 200); do curl -s -o /dev/null "http://127.0.0.1:8088/q$i"; done
chromium --headless --no-sandbox --screenshot=docs/status.png --window-size=1200,700 http://127.0.0.1:9000/status
