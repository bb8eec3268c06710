# Shared setup of the end-to-end benchmarks (sourced by h2.sh and tls_handshake.sh; the same
# backends and CPU accounting as compare.sh): a scratch directory and a trap that stops every
# process started, three identical nginx backends on 127.0.0.1, CPU ticks from /proc, medians.
#
# The sourcing script sets `set -euo pipefail`, then calls `e2e_init NAME`, and starts its
# processes in the background adding each pid to PIDS.

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

# CPU ticks (utime + stime, all threads) of a process and its children (nginx's workers).
e2e_ticks() {
  local pid="$1" total=0 p
  for p in "$pid" $(pgrep -P "$pid" || true); do
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
