#!/usr/bin/env bash
# HTTP/2 throughput on loopback (issue 18): h2load, 16 connections x 16 streams, h2c (prior
# knowledge) to lbkit's README proxy, HAProxy 2.6 (`bind ... proto h2`) and nginx
# (`listen ... http2`), each in front of the same three HTTP/1.1 nginx backends as compare.sh,
# measured side by side.
#
#   bash benches/e2e/h2.sh                    # 3 interleaved rounds of 10 s per proxy
#   DURATION=2 ROUNDS=1 bash benches/e2e/h2.sh
#   WORKERS=1 bash benches/e2e/h2.sh          # one worker thread/process per proxy (default 2)
#   LBKIT_BIN=/path/to/reverse_proxy bash benches/e2e/h2.sh   # that build, not rebuilt
#   BASELINE=/path/to/old/reverse_proxy bash benches/e2e/h2.sh   # also an older build
#   PORT=27300 bash benches/e2e/h2.sh         # backends on PORT+1..3, proxies on PORT+100..102
#   UPSTREAM=h2 bash benches/e2e/h2.sh        # h2 -> h2: h2c backends, lbkit `--upstream h2`,
#                                             # HAProxy `proto h2` servers (nginx cannot: skipped)
#
# Requests/s is h2load's; CPU time per request is utime + stime of the proxy's processes (all
# threads; nginx's master and workers) from /proc over each h2load run, divided by the
# requests h2load saw succeed. Each proxy runs WORKERS worker threads (lbkit `--threads`,
# HAProxy `nbthread`) or processes (nginx), round robin, keep-alive to the backends. Prints
# medians over the rounds and each proxy's ratio to HAProxy (issue 18's target: lbkit
# >= 1.1x HAProxy's requests/s). Everything listens on 127.0.0.1; everything started is
# stopped on exit.
set -euo pipefail

DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-3}"
WORKERS="${WORKERS:-2}"
CONNS="${CONNS:-16}"
STREAMS="${STREAMS:-16}"
UPSTREAM="${UPSTREAM:-http1}"
case "$UPSTREAM" in
  http1) BACKEND_PROTO=""; SERVER_PROTO="" ;;
  h2) BACKEND_PROTO=http2; SERVER_PROTO="proto h2" ;;
  *) echo "UPSTREAM is http1 or h2" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
# shellcheck source=benches/e2e/common.sh
. "$ROOT/benches/e2e/common.sh"
e2e_init h2
e2e_need h2load:nghttp2-client nginx:nginx haproxy:haproxy curl:curl

e2e_ports "${PORT:-27300}"
declare -A PID
e2e_backends $BACKEND_PROTO

# --- nginx: h2c on its listener (`http2` without `ssl`: prior knowledge, as h2load speaks).
if [ "$UPSTREAM" = http1 ]; then
  e2e_nginx_proxy nginx "$NGX http2" "http2_max_concurrent_streams 128;"
  PID[nginx]=$E2E_PID
fi

# --- HAProxy: h2c on the bind line, HTTP/1.1 (or h2c) to the servers.
e2e_haproxy "$HAP proto h2" "$SERVER_PROTO"
PID[haproxy]=$E2E_PID

# --- lbkit: the README's proxy (HTTP/1.1 and h2c on one listener), HTTP/1.1 upstream.
LBKIT_BIN="$(e2e_example reverse_proxy "${LBKIT_BIN:-}")"
RUST_LOG=error "$LBKIT_BIN" \
  --listen "$LBKIT" --backends "$B1,$B2,$B3" --threads "$WORKERS" --strategy round_robin \
  --upstream "$UPSTREAM" >/dev/null 2>&1 &
PIDS+=($!); PID[lbkit]=$!
if [ -n "${BASELINE:-}" ]; then
  RUST_LOG=error "$BASELINE" \
    --listen "$BASE" --backends "$B1,$B2,$B3" --threads "$WORKERS" --strategy round_robin \
    --upstream "$UPSTREAM" >/dev/null 2>&1 &
  PIDS+=($!); PID[lbkit_base]=$!
fi

declare -A ADDR=([lbkit]=$LBKIT [haproxy]=$HAP [nginx]=$NGX [lbkit_base]=$BASE)
ORDER=(lbkit haproxy)
[ "$UPSTREAM" = http1 ] && ORDER+=(nginx)
[ -n "${BASELINE:-}" ] && ORDER+=(lbkit_base)
for a in $B1 $B2 $B3; do
  if [ "$UPSTREAM" = h2 ]; then e2e_wait_up "http://$a/" --http2-prior-knowledge
  else e2e_wait_up "http://$a/"; fi
done
for t in "${ORDER[@]}"; do e2e_wait_up "http://${ADDR[$t]}/" --http2-prior-knowledge; done
H2LOAD=(h2load -c"$CONNS" -m"$STREAMS")

# One h2load run against proxy $1; prints "rps mean_ms succeeded failed cpu_us_per_request"
# (CPU per succeeded request).
measure() {
  local out t0 t1 pid="${PID[$1]}"
  t0="$(e2e_ticks "$pid")"
  out="$("${H2LOAD[@]}" -D "$DURATION" "http://${ADDR[$1]}/" 2>&1)" || true
  t1="$(e2e_ticks "$pid")"
  local rps ok failed mean
  # Requests/s counts the requests answered 2xx only (h2load's own figure counts all).
  rps="$(awk '/^finished in/ {t = $3 + 0} /^status codes:/ {ok = $3}
              END {if (t > 0) printf "%.1f", ok / t}' <<<"$out")"
  # Succeeded: answered 2xx; failed: h2load's failed, errored and timed out, and 4xx/5xx.
  ok="$(awk '/^status codes:/ {print $3}' <<<"$out")"
  failed="$(awk '/^requests:/ {n += $10 + $12 + $14} /^status codes:/ {n += $7 + $9}
                 END {print n + 0}' <<<"$out")"
  mean="$(awk '/^time for request:/ {print $6}' <<<"$out")"
  if [ -z "$rps" ] || [ -z "$ok" ]; then
    echo "h2load against $1 failed:" >&2
    echo "$out" >&2
    exit 1
  fi
  echo "${rps:-0} $(e2e_ms "$mean") ${ok:-0} ${failed:-0} $(e2e_cpu_us "$((t1 - t0))" "$ok")"
}

echo "warming up..." >&2
for t in "${ORDER[@]}"; do "${H2LOAD[@]}" -D 2 "http://${ADDR[$t]}/" >/dev/null 2>&1 || true; done

e2e_rounds "rps mean-ms succeeded failed cpu-us/req"

echo
echo "Machine: $(nproc) cores, $(uname -sr); h2load -c$CONNS -m$STREAMS -D $DURATION (h2c, one"
echo "client thread), $ROUNDS rounds interleaved, medians. Proxies: $WORKERS worker threads/processes"
echo "each, round robin over 3 nginx backends speaking $UPSTREAM, keep-alive."
echo
echo "| proxy | requests/s | mean ms/request | failed | rps vs HAProxy | CPU µs/request | CPU vs HAProxy |"
echo "|---|---|---|---|---|---|---|"
HAP_RPS="$(e2e_col "$WORK/results" haproxy 2)"; HAP_CPU="$(e2e_col "$WORK/results" haproxy 6)"
for t in "${ORDER[@]}"; do
  rps="$(e2e_col "$WORK/results" "$t" 2)"; mean="$(e2e_col "$WORK/results" "$t" 3)"
  failed="$(awk -v t="$t" '$1==t {n += $5} END {print n+0}' "$WORK/results")"
  cpu="$(e2e_col "$WORK/results" "$t" 6)"
  printf "| %s | %.0f | %s | %s | %s | %s | %s |\n" "$t" "$rps" "$mean" "$failed" \
    "$(e2e_ratio "$rps" "$HAP_RPS")" "$cpu" "$(e2e_ratio "$cpu" "$HAP_CPU")"
done
FAILED="$(awk '{n += $5} END {print n + 0}' "$WORK/results")"
if [ "$FAILED" -gt 0 ]; then
  echo; echo "WARNING: $FAILED requests failed (not 2xx, errored or timed out); they are not counted."
fi
RATIO="$(e2e_ratio "$(e2e_col "$WORK/results" lbkit 2)" "$HAP_RPS")"
if awk -v r="$RATIO" 'BEGIN {exit !(r >= 1.1)}'; then
  echo; echo "issue 18 target (lbkit >= 1.1x HAProxy requests/s): met (${RATIO}x)"
else
  echo; echo "issue 18 target (lbkit >= 1.1x HAProxy requests/s): missed (${RATIO}x)"
fi
