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
WORK="$(mktemp -d /tmp/lbkit-e2e.XXXXXX)"
PIDS=()

cleanup() {
  for pid in "${PIDS[@]:-}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need haproxy; then
  echo "installing wrk, nginx, haproxy from Debian..." >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx haproxy >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
HAPROXY="$(command -v haproxy || echo /usr/sbin/haproxy)"

# PORT=N moves every port (N+1..N+3 backends, N+100..N+103 proxies), so that two runs can
# share a machine.
P="${PORT:-19000}"
B1=127.0.0.1:$((P + 1)); B2=127.0.0.1:$((P + 2)); B3=127.0.0.1:$((P + 3))
LBKIT=127.0.0.1:$((P + 100)); NGX=127.0.0.1:$((P + 101)); HAP=127.0.0.1:$((P + 102))
BASE=127.0.0.1:$((P + 103))
declare -A PID

# --- backends: one nginx, three identical servers answering a small static body.
mkdir -p "$WORK/backends" "$WORK/proxy"
cat > "$WORK/backends/nginx.conf" <<CONF
worker_processes 1;
error_log $WORK/backends/error.log crit;
pid $WORK/backends/nginx.pid;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen $B1; location / { return 200 "hello from backend\n"; } }
  server { listen $B2; location / { return 200 "hello from backend\n"; } }
  server { listen $B3; location / { return 200 "hello from backend\n"; } }
}
CONF
"$NGINX" -c "$WORK/backends/nginx.conf" -p "$WORK/backends" &
PIDS+=($!)

# --- nginx as the proxy.
cat > "$WORK/proxy/nginx.conf" <<CONF
worker_processes $WORKERS;
error_log $WORK/proxy/error.log crit;
pid $WORK/proxy/nginx.pid;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backends {
    server $B1; server $B2; server $B3;
    keepalive 128;
  }
  server {
    listen $NGX;
    location / {
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_buffering on;
    }
  }
}
CONF
"$NGINX" -c "$WORK/proxy/nginx.conf" -p "$WORK/proxy" &
PIDS+=($!); PID[nginx]=$!

# --- HAProxy.
cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread $WORKERS
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  option forwardfor
  http-reuse always
frontend fe
  bind $HAP
  default_backend be
backend be
  balance roundrobin
  server b1 $B1
  server b2 $B2
  server b3 $B3
CONF
"$HAPROXY" -f "$WORK/haproxy.cfg" -db >/dev/null 2>&1 &
PIDS+=($!); PID[haproxy]=$!

# --- lbkit: the README's example in release mode, over the same backends.
if [ -z "${LBKIT_BIN:-}" ]; then
  echo "building examples/reverse_proxy (release)..." >&2
  (cd "$ROOT" && cargo build -q --release --example reverse_proxy)
  LBKIT_BIN="$ROOT/target/release/examples/reverse_proxy"
fi
RUST_LOG=error "$LBKIT_BIN" \
  --listen "$LBKIT" --backends "$B1,$B2,$B3" --threads "$WORKERS" --strategy round_robin \
  >/dev/null 2>&1 &
PIDS+=($!); PID[lbkit]=$!
if [ -n "${BASELINE:-}" ]; then
  RUST_LOG=error "$BASELINE" \
    --listen "$BASE" --backends "$B1,$B2,$B3" --threads "$WORKERS" --strategy round_robin \
    >/dev/null 2>&1 &
  PIDS+=($!); PID[lbkit_base]=$!
fi

wait_up() {
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://$1/" && return 0
    sleep 0.1
  done
  echo "$1 did not come up" >&2
  exit 1
}
for a in $B1 $B2 $B3 $LBKIT $NGX $HAP ${BASELINE:+$BASE}; do wait_up "$a"; done

# CPU ticks (utime + stime, all threads) of a process and its children (nginx's workers).
ticks() {
  local pid="$1" total=0 p
  for p in "$pid" $(pgrep -P "$pid" || true); do
    [ -r "/proc/$p/stat" ] || continue
    total=$((total + $(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat")))
  done
  echo "$total"
}
HZ="$(getconf CLK_TCK)"

# One wrk run against target $1; prints "rps p50_ms p99_ms errors cpu_us_per_request".
measure() {
  local out t0 t1 pid="${PID[$1]:-}"
  [ -n "$pid" ] && t0="$(ticks "$pid")"
  out="$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://${NAME[$1]}/" 2>&1)"
  [ -n "$pid" ] && t1="$(ticks "$pid")"
  local rps p50 p99 errs reqs cpu=0
  rps="$(awk '/Requests\/sec/ {print $2}' <<<"$out")"
  p50="$(awk '$1=="50%" {print $2}' <<<"$out")"
  p99="$(awk '$1=="99%" {print $2}' <<<"$out")"
  errs="$(awk '/Non-2xx|Socket errors/ {n++} END {print n+0}' <<<"$out")"
  reqs="$(awk '/requests in/ {print $1}' <<<"$out")"
  if [ -n "$pid" ] && [ "${reqs:-0}" -gt 0 ]; then
    cpu="$(awk -v d="$((t1 - t0))" -v hz="$HZ" -v n="$reqs" 'BEGIN {printf "%.1f", d / hz * 1e6 / n}')"
  fi
  echo "$rps $(to_ms "$p50") $(to_ms "$p99") $errs $cpu"
}
to_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
    else print v }'
}

declare -A NAME=([direct]=$B1 [lbkit]=$LBKIT [nginx]=$NGX [haproxy]=$HAP [lbkit_base]=$BASE)
ORDER=(direct lbkit nginx haproxy)
[ -n "${BASELINE:-}" ] && ORDER+=(lbkit_base)
echo "warming up..." >&2
for t in "${ORDER[@]}"; do wrk -t1 -c"$CONNS" -d2s "http://${NAME[$t]}/" >/dev/null 2>&1; done

for r in $(seq 1 "$ROUNDS"); do
  for t in "${ORDER[@]}"; do
    res="$(measure "$t")"
    echo "$t $res" >> "$WORK/results"
    echo "round $r  $t: $res   (rps p50ms p99ms error-lines cpu-us/req)" >&2
  done
done

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }
col() { awk -v t="$1" -v c="$2" '$1==t {print $c}' "$WORK/results" | median; }

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
