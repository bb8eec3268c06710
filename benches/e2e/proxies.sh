# The setup of the idle-memory benchmark (sourced by idle_memory.sh; compare.sh, h2.sh and
# tls_handshake.sh source common.sh, which the two should become one of): three
# nginx backends, nginx and HAProxy as proxies configured as nginx and HAProxy users would, and
# lbkit's reverse_proxy example over the same backends. Everything listens on 127.0.0.1 only;
# everything started here is stopped when the sourcing script exits.
#
# Before sourcing, a script may set WORKERS (worker processes/threads per proxy, default 1),
# NGINX_CONNS (nginx's worker_connections, both sides of a proxied connection count, default
# 4096), HAPROXY_MAXCONN (default 8192), PORT (backends on PORT+1..3, lbkit, nginx, HAProxy
# and a baseline lbkit on PORT+100..103; default 19000, so that two runs can share a machine)
# and LBKIT_BIN (a reverse_proxy build to run; default: build the example in release mode).

WORKERS="${WORKERS:-1}"
NGINX_CONNS="${NGINX_CONNS:-4096}"
HAPROXY_MAXCONN="${HAPROXY_MAXCONN:-8192}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$(mktemp -d /tmp/lbkit-e2e.XXXXXX)"
PIDS=()
declare -A PID

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

P="${PORT:-19000}"
B1=127.0.0.1:$((P + 1)); B2=127.0.0.1:$((P + 2)); B3=127.0.0.1:$((P + 3))
LBKIT=127.0.0.1:$((P + 100)); NGX=127.0.0.1:$((P + 101)); HAP=127.0.0.1:$((P + 102))
BASE=127.0.0.1:$((P + 103))
BACKENDS="$B1,$B2,$B3"
mkdir -p "$WORK/backends" "$WORK/proxy"

# Three identical backend servers (one nginx) answering a small static body.
start_backends() {
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
}

# nginx as the proxy on $NGX: round robin, keep-alive to the backends.
start_nginx() {
  cat > "$WORK/proxy/nginx.conf" <<CONF
worker_processes $WORKERS;
error_log $WORK/proxy/error.log crit;
pid $WORK/proxy/nginx.pid;
daemon off;
events { worker_connections $NGINX_CONNS; }
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
}

# HAProxy on $HAP: round robin, keep-alive both sides, connections to the backends reused.
# `no strict-limits`: it runs (with a warning) when the file-descriptor limit is below the
# 2 × maxconn it reserves, as for 10 000 idle clients under a hard limit of 20 000.
start_haproxy() {
  cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread $WORKERS
  maxconn $HAPROXY_MAXCONN
  no strict-limits
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
}

# The README's example in release mode, unless LBKIT_BIN names a build; sets LBKIT_BIN.
build_lbkit() {
  if [ -z "${LBKIT_BIN:-}" ]; then
    echo "building examples/reverse_proxy (release)..." >&2
    (cd "$ROOT" && cargo build -q --release --example reverse_proxy)
    LBKIT_BIN="$ROOT/target/release/examples/reverse_proxy"
  fi
}

# start_lbkit NAME BINARY ADDR: a reverse_proxy binary on ADDR over the backends, round robin.
start_lbkit() {
  RUST_LOG=error "$2" \
    --listen "$3" --backends "$BACKENDS" --threads "$WORKERS" --strategy round_robin \
    >/dev/null 2>&1 &
  PIDS+=($!); PID[$1]=$!
}

wait_up() {
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://$1/" && return 0
    sleep 0.1
  done
  echo "$1 did not come up" >&2
  exit 1
}

# The PIDs of a process and its children (nginx's workers).
proc_tree() {
  echo "$1"
  pgrep -P "$1" || true
}

# The median of the numbers on stdin, one a line.
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }
# The median of column $2 over the lines of $WORK/results that start with target $1.
col() { awk -v t="$1" -v c="$2" '$1==t {print $c}' "$WORK/results" | median; }
