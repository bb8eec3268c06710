#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: repeatable whatever else
# the machine is doing (a wrk run on 2 shared cores moves by 10-15 % between rounds; this
# count moves by well under 1 %). It measures work, not waiting: the kernel's share (the
# syscalls, a good half of a proxy's CPU time) is not in it.
#
#   bash benches/e2e/callgrind.sh                        # the README proxy of this checkout
#   BIN=/path/to/reverse_proxy bash benches/e2e/callgrind.sh   # another build of it
#   N=50000 TOP=40 bash benches/e2e/callgrind.sh
#   CLIENT=h2 bash benches/e2e/callgrind.sh              # h2c clients, 16 streams each
#   CLIENT=h2 UPSTREAM=h2 bash benches/e2e/callgrind.sh  # h2 -> h2 (h2c backends, --upstream h2)
#   SAVE=/tmp/cg.out bash benches/e2e/callgrind.sh       # keep callgrind's output for callgrind_annotate
#
# Three nginx backends on 127.0.0.1 (as benches/e2e/compare.sh), the proxy on one thread
# (`--threads 1`, round robin) under callgrind, its counters zeroed once it answers, then N
# keep-alive GETs from h2load over 16 connections (HTTP/1.1, or with CLIENT=h2 h2c with 16
# streams in flight on each, as benches/e2e/h2.sh); prints instructions per request and the
# functions with the most instructions (inclusive). Everything it starts is stopped on exit.
set -euo pipefail

N="${N:-20000}"
CLIENT="${CLIENT:-http1}"
UPSTREAM="${UPSTREAM:-http1}"
case "$CLIENT" in
  http1) LOAD=(--h1) ;;
  h2) LOAD=(-m 16) ;;
  *) echo "CLIENT is http1 or h2" >&2; exit 2 ;;
esac
case "$UPSTREAM" in
  http1) BACKEND_PROTO="" ;;
  h2) BACKEND_PROTO=http2 ;;
  *) echo "UPSTREAM is http1 or h2" >&2; exit 2 ;;
esac
TOP="${TOP:-25}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
# shellcheck source=benches/e2e/common.sh
. "$ROOT/benches/e2e/common.sh"
e2e_init callgrind
e2e_need valgrind:valgrind h2load:nghttp2-client nginx:nginx curl:curl
BIN="$(e2e_example reverse_proxy "${BIN:-}")"

B1=127.0.0.1:19201; B2=127.0.0.1:19202; B3=127.0.0.1:19203; PROXY=127.0.0.1:19200
e2e_backends $BACKEND_PROTO

RUST_LOG=error valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" "$BIN" \
  --listen "$PROXY" --backends "$B1,$B2,$B3" --threads 1 --strategy round_robin \
  --upstream "$UPSTREAM" >"$WORK/proxy.log" 2>&1 &
VG=$!
PIDS+=($VG)
for _ in $(seq 1 300); do
  curl -s -o /dev/null -m 1 "http://$PROXY/" && break
  sleep 0.2
done
curl -s -o /dev/null -m 5 "http://$PROXY/" || { echo "the proxy did not come up" >&2; exit 1; }
callgrind_control -z "$VG" >/dev/null
h2load "${LOAD[@]}" -n "$N" -c 16 "http://$PROXY/" | grep -E '^requests:' >&2
callgrind_control -d "$VG" >/dev/null
sleep 2
out="$(ls -S "$WORK"/cg.out* | head -1)"
total="$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')"
[ -n "${SAVE:-}" ] && cp "$out" "$SAVE"
echo "$BIN (client $CLIENT, upstream $UPSTREAM)"
echo "instructions per request: $((total / N))  ($total for $N requests)"
echo
echo "most instructions, inclusive (per request):"
callgrind_annotate --inclusive=yes "$out" 2>/dev/null \
  | awk -v n="$N" '/^ *[0-9,]+ +\(/ {v=$1; gsub(",", "", v); $1=""; $2=""; printf "%8d %s\n", v / n, substr($0, 3)}' \
  | grep -v -E 'lang_start|libc_start|below main|ld-linux|::main |block_on|run_task|raw::poll|harness|core::poll|enter_runtime|LocalKey|backtrace' \
  | head -n "$TOP" | cut -c1-160
