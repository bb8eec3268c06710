#!/usr/bin/env bash
# End-to-end proxy benchmark on loopback: lbkit's reverse_proxy example against nginx and
# HAProxy, and against the backends directly (the limit), measured side by side with wrk.
#
#   bash benches/e2e/compare.sh            # 3 interleaved rounds of 10 s per target
#   DURATION=5 ROUNDS=1 bash benches/e2e/compare.sh
#   WORKERS=2 bash benches/e2e/compare.sh   # two worker threads/processes per proxy
#   BASELINE=/path/to/old/reverse_proxy bash benches/e2e/compare.sh   # also an older build
#   LBKIT_BIN=/path/to/reverse_proxy bash benches/e2e/compare.sh       # this build, not rebuilt
#
# Besides requests/s and latency it reports each proxy's CPU time per request: utime + stime
# of the proxy's processes (all threads; nginx's master and workers) from /proc over each wrk
# run, divided by the requests wrk counted.
#
# Everything listens on 127.0.0.1 only; everything it starts is stopped when it exits.
# Setup kept equal: three identical nginx backends (static 200, keep-alive), each proxy with
# ONE worker thread/process, round robin, keep-alive to the backends, the same wrk load
# (1 thread, CONNS connections). Prints medians of requests/s and p50/p99 latency, and ratios.
set -euo pipefail

DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-3}"
CONNS="${CONNS:-64}"
WORKERS="${WORKERS:-1}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
# shellcheck source=benches/e2e/common.sh
. "$ROOT/benches/e2e/common.sh"
e2e_init e2e
e2e_need wrk:wrk nginx:nginx haproxy:haproxy curl:curl

e2e_ports "${PORT:-19000}"
declare -A PID

# --- backends: one nginx, three identical servers answering a small static body.
e2e_backends

# --- nginx as the proxy.
e2e_nginx_proxy proxy "$NGX"
PID[nginx]=$E2E_PID

# --- HAProxy.
e2e_haproxy "$HAP"
PID[haproxy]=$E2E_PID

# --- lbkit: the README's example in release mode, over the same backends.
LBKIT_BIN="$(e2e_example reverse_proxy "${LBKIT_BIN:-}")"
e2e_lbkit_proxies_up

# One wrk run against target $1; prints "rps p50_ms p99_ms errors cpu_us_per_request".
measure() {
  local out t0 t1 pid="${PID[$1]:-}"
  [ -n "$pid" ] && t0="$(e2e_ticks "$pid")"
  out="$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://${NAME[$1]}/" 2>&1)"
  [ -n "$pid" ] && t1="$(e2e_ticks "$pid")"
  local rps p50 p99 errs reqs cpu=0
  rps="$(awk '/Requests\/sec/ {print $2}' <<<"$out")"
  p50="$(awk '$1=="50%" {print $2}' <<<"$out")"
  p99="$(awk '$1=="99%" {print $2}' <<<"$out")"
  errs="$(awk '/Non-2xx|Socket errors/ {n++} END {print n+0}' <<<"$out")"
  reqs="$(awk '/requests in/ {print $1}' <<<"$out")"
  if [ -n "$pid" ] && [ "${reqs:-0}" -gt 0 ]; then
    cpu="$(awk -v d="$((t1 - t0))" -v hz="$HZ" -v n="$reqs" 'BEGIN {printf "%.1f", d / hz * 1e6 / n}')"
  fi
  echo "$rps $(e2e_ms "$p50") $(e2e_ms "$p99") $errs $cpu"
}

declare -A NAME=([direct]=$B1 [lbkit]=$LBKIT [nginx]=$NGX [haproxy]=$HAP [lbkit_base]=$BASE)
ORDER=(direct lbkit nginx haproxy)
[ -n "${BASELINE:-}" ] && ORDER+=(lbkit_base)
echo "warming up..." >&2
for t in "${ORDER[@]}"; do wrk -t1 -c"$CONNS" -d2s "http://${NAME[$t]}/" >/dev/null 2>&1; done

e2e_rounds "rps p50ms p99ms error-lines cpu-us/req"

col() { e2e_col "$WORK/results" "$1" "$2"; }

echo
echo "Machine: $(nproc) cores, $(uname -sr); wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS rounds interleaved, medians."
echo "Proxies: $WORKERS worker thread/process each, round robin over 3 nginx backends, keep-alive."
echo
echo "| target | requests/s | p50 ms | p99 ms | rps vs nginx | rps vs direct | CPU µs/request | CPU vs nginx |"
echo "|---|---|---|---|---|---|---|---|"
NG_RPS="$(col nginx 2)"; DIR_RPS="$(col direct 2)"; NG_CPU="$(col nginx 6)"
for t in "${ORDER[@]}"; do
  rps="$(col "$t" 2)"; p50="$(col "$t" 3)"; p99="$(col "$t" 4)"; cpu="$(col "$t" 6)"
  printf "| %s | %.0f | %s | %s | %.2f | %.2f | %s | %s |\n" "$t" "$rps" "$p50" "$p99" \
    "$(awk -v a="$rps" -v b="$NG_RPS" 'BEGIN {print a/b}')" \
    "$(awk -v a="$rps" -v b="$DIR_RPS" 'BEGIN {print a/b}')" \
    "$( [ "$t" = direct ] && echo - || echo "$cpu")" \
    "$( [ "$t" = direct ] && echo - || awk -v a="$cpu" -v b="$NG_CPU" 'BEGIN {printf "%.2f", a/b}')"
done
