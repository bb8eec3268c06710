# Shared setup of the end-to-end benchmarks (sourced by compare.sh, h2.sh, tls_handshake.sh,
# idle_memory.sh and callgrind.sh): a scratch directory and a trap that stops every process
# started, three identical nginx backends on 127.0.0.1, nginx, HAProxy and lbkit's
# reverse_proxy as proxies over them, CPU ticks from /proc, medians.
#
# The sourcing script sets `set -euo pipefail`, then calls `e2e_init NAME`, and starts its
# processes in the background adding each pid to PIDS. It may set WORKERS (worker
# processes/threads per proxy), NGINX_CONNS (nginx's worker_connections, both sides of a
# proxied connection count; default 4096) and HAPROXY_MAXCONN (default 8192).

# A scratch directory ($WORK) and the trap that stops what the script started, then removes it.
e2e_init() {
  WORK="$(mktemp -d "/tmp/lbkit-$1.XXXXXX")"
  PIDS=()
  trap e2e_cleanup EXIT INT TERM
}
e2e_cleanup() {
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}

# The addresses, from port P (`e2e_ports P`; PORT=N in the environment moves them, so that
# two runs can share a machine): backends B1 B2 B3 on P+1..P+3, proxies LBKIT NGX HAP and a
# baseline lbkit BASE on P+100..P+103.
e2e_ports() {
  local p="$1"
  B1=127.0.0.1:$((p + 1)); B2=127.0.0.1:$((p + 2)); B3=127.0.0.1:$((p + 3))
  LBKIT=127.0.0.1:$((p + 100)); NGX=127.0.0.1:$((p + 101)); HAP=127.0.0.1:$((p + 102))
  BASE=127.0.0.1:$((p + 103))
}

# Installs from Debian the packages whose command is missing: `e2e_need cmd:package ...`.
e2e_need() {
  local missing=() item
  for item in "$@"; do
    command -v "${item%%:*}" >/dev/null 2>&1 || missing+=("${item#*:}")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  echo "installing ${missing[*]} from Debian..." >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Three identical HTTP/1.1 backends served by one nginx (a small static body, keep-alive), as in
# compare.sh, on $B1 $B2 $B3 (set by the caller); `e2e_backends http2` serves h2c instead.
e2e_backends() {
  local proto="${1:-}"
  mkdir -p "$WORK/backends"
  cat > "$WORK/backends/nginx.conf" <<CONF
worker_processes 1;
error_log $WORK/backends/error.log crit;
pid $WORK/backends/nginx.pid;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen $B1 $proto; location / { return 200 "hello from backend\n"; } }
  server { listen $B2 $proto; location / { return 200 "hello from backend\n"; } }
  server { listen $B3 $proto; location / { return 200 "hello from backend\n"; } }
}
CONF
  "$(command -v nginx || echo /usr/sbin/nginx)" -c "$WORK/backends/nginx.conf" -p "$WORK/backends" &
  PIDS+=($!)
}

# nginx as the proxy over the backends, WORKERS worker processes, started in the background
# with its pid in E2E_PID: `e2e_nginx_proxy DIR "LISTEN PARAMS" ["MORE SERVER DIRECTIVES"]`
# (round robin, keep-alive to the backends, the usual forwarding headers).
e2e_nginx_proxy() {
  mkdir -p "$WORK/$1"
  cat > "$WORK/$1/nginx.conf" <<CONF
worker_processes $WORKERS;
error_log $WORK/$1/error.log crit;
pid $WORK/$1/nginx.pid;
daemon off;
events { worker_connections ${NGINX_CONNS:-4096}; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backends {
    server $B1; server $B2; server $B3;
    keepalive 128;
  }
  server {
    listen $2;
    ${3:-}
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
  "$(command -v nginx || echo /usr/sbin/nginx)" -c "$WORK/$1/nginx.conf" -p "$WORK/$1" &
  E2E_PID=$!
  PIDS+=("$E2E_PID")
}

# HAProxy over the backends, WORKERS threads, round robin, keep-alive (`http-reuse always`),
# started in the background with its pid in E2E_PID:
# `e2e_haproxy "BIND ADDR AND OPTIONS" ["SERVER OPTIONS"] ["GLOBAL LINE"]`.
e2e_haproxy() {
  cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread $WORKERS
  maxconn ${HAPROXY_MAXCONN:-8192}
  ${3:-}
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  option forwardfor
  http-reuse always
frontend fe
  bind $1
  default_backend be
backend be
  balance roundrobin
  server b1 $B1 ${2:-}
  server b2 $B2 ${2:-}
  server b3 $B3 ${2:-}
CONF
  "$(command -v haproxy || echo /usr/sbin/haproxy)" -f "$WORK/haproxy.cfg" -db >/dev/null 2>&1 &
  E2E_PID=$!
  PIDS+=("$E2E_PID")
}

# lbkit's reverse_proxy (the README's proxy) over the backends, WORKERS threads, round robin,
# started in the background with its pid in E2E_PID: `e2e_lbkit_proxy BINARY ADDR`.
e2e_lbkit_proxy() {
  RUST_LOG=error "$1" \
    --listen "$2" --backends "$B1,$B2,$B3" --threads "$WORKERS" --strategy round_robin \
    >/dev/null 2>&1 &
  E2E_PID=$!
  PIDS+=("$E2E_PID")
}

# LBKIT_BIN on $LBKIT and, when BASELINE names an older build, that one on $BASE (pids in
# PID[lbkit] and PID[lbkit_base]; the caller declares `PID` with `declare -A`), then waits
# until the backends and the three proxies answer: `e2e_lbkit_proxies_up`.
e2e_lbkit_proxies_up() {
  e2e_lbkit_proxy "$LBKIT_BIN" "$LBKIT"
  PID[lbkit]=$E2E_PID
  if [ -n "${BASELINE:-}" ]; then
    e2e_lbkit_proxy "$BASELINE" "$BASE"
    PID[lbkit_base]=$E2E_PID
  fi
  local a
  for a in $B1 $B2 $B3 $LBKIT $NGX $HAP ${BASELINE:+$BASE}; do e2e_wait_up "http://$a/"; done
}

# The path of example NAME's release binary: GIVEN when set (not rebuilt), else built here:
# `BIN="$(e2e_example NAME "${GIVEN:-}")"`.
e2e_example() {
  if [ -n "$2" ]; then echo "$2"; return; fi
  echo "building examples/$1 (release)..." >&2
  (cd "$ROOT" && cargo build -q --release --example "$1")
  echo "$ROOT/target/release/examples/$1"
}

# ROUNDS rounds, each running the caller's `measure TARGET` once per target of ORDER in turn
# (reps interleaved), appending "TARGET RESULT" to $WORK/results: `e2e_rounds "LEGEND"`.
e2e_rounds() {
  local r t res
  for r in $(seq 1 "$ROUNDS"); do
    for t in "${ORDER[@]}"; do
      res="$(measure "$t")"
      echo "$t $res" >> "$WORK/results"
      echo "round $r  $t: $res   ($1)" >&2
    done
  done
}

# A duration as wrk or h2load print it (`512us`, `1.2ms`, `2s`) in milliseconds.
e2e_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
    else print v }'
}

# Waits (10 s at most) until `curl ARGS... URL` gets an answer: `e2e_wait_up URL [curl args]`.
e2e_wait_up() {
  local url="$1"; shift
  for _ in $(seq 1 100); do
    curl -s -o /dev/null --max-time 1 "$@" "$url" && return 0
    sleep 0.1
  done
  echo "$url did not come up" >&2
  exit 1
}

# The pids of a process and its children (nginx's workers), one a line.
e2e_tree() {
  echo "$1"
  pgrep -P "$1" || true
}

# CPU ticks (utime + stime, all threads) of a process and its children (nginx's workers).
e2e_ticks() {
  local total=0 p
  for p in $(e2e_tree "$1"); do
    [ -r "/proc/$p/stat" ] || continue
    total=$((total + $(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat")))
  done
  echo "$total"
}
HZ="$(getconf CLK_TCK)"

# Microseconds of CPU per unit: `e2e_cpu_us TICKS COUNT`.
e2e_cpu_us() {
  awk -v d="$1" -v hz="$HZ" -v n="$2" 'BEGIN {if (n > 0) printf "%.1f", d / hz * 1e6 / n; else print 0}'
}

# The median of the numbers on stdin, one a line.
e2e_median() {
  sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'
}

# The median of column C for the rows of target T in file F: `e2e_col F T C`.
e2e_col() { awk -v t="$2" -v c="$3" '$1==t {print $c}' "$1" | e2e_median; }

# a / b with two decimals.
e2e_ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}'; }
