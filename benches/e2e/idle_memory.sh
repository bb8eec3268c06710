#!/usr/bin/env bash
# Memory per idle keep-alive client connection: lbkit's reverse_proxy example, nginx and
# HAProxy (configured as in compare.sh: the setup is common.sh's) each get N client connections
# that make one GET through the proxy and then stay open and idle; the growth of the proxy's
# resident memory (VmRSS of all its processes, from /proc) divided by N is what one idle
# connection costs. Also counts the connections the proxy holds to the backends meanwhile.
#
#   bash benches/e2e/idle_memory.sh                 # N=10000, 3 rounds
#   N=5000 ROUNDS=1 bash benches/e2e/idle_memory.sh
#   BASELINE=/path/to/old/reverse_proxy bash benches/e2e/idle_memory.sh   # an older build beside it
#
# Each round starts every proxy fresh; within a round the targets take turns (their order
# rotates between rounds). Per target: a warm-up of WARMUP connections (one GET each, then
# closed), the resident memory read, N connections opened (CONCURRENCY at a time, each one
# GET, answer read), a pause of SETTLE seconds, the memory read again. The client is
# idle_clients.py (Python asyncio). The measurement ends well within every proxy's keep-alive
# timeout (HAProxy 30 s, lbkit 30 s for HTTP/1.1, nginx 75 s); connections the proxy closed
# before it are reported.
set -euo pipefail

N="${N:-10000}"
ROUNDS="${ROUNDS:-3}"
WARMUP="${WARMUP:-200}"
CONCURRENCY="${CONCURRENCY:-200}"
SETTLE="${SETTLE:-3}"
# Both sides of each proxied connection count against nginx's worker_connections; HAProxy
# sizes its file-descriptor needs from maxconn.
NGINX_CONNS="${NGINX_CONNS:-$((N + 2048))}"
HAPROXY_MAXCONN="${HAPROXY_MAXCONN:-$((N + 1024))}"
# Other ports than compare.sh's, so that both can run at once.
PORT="${PORT:-19200}"
# The client holds N sockets, each proxy N plus its backend connections.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((N + 1100)) ]; then
  echo "file-descriptor limit $(ulimit -n) is too low for N=$N" >&2
  exit 1
fi

WORKERS="${WORKERS:-1}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
# shellcheck source=benches/e2e/common.sh
. "$ROOT/benches/e2e/common.sh"
e2e_init idle
e2e_need nginx:nginx haproxy:haproxy curl:curl python3:python3 ss:iproute2
CLIENT="$ROOT/benches/e2e/idle_clients.py"
LBKIT_BIN="$(e2e_example reverse_proxy "${LBKIT_BIN:-}")"

e2e_ports "$PORT"
declare -A PID
declare -A NAME=([lbkit]=$LBKIT [nginx]=$NGX [haproxy]=$HAP [lbkit_base]=$BASE)
TARGETS=(lbkit nginx haproxy)
if [ -n "${BASELINE:-}" ]; then TARGETS+=(lbkit_base); fi

# Resident memory (KiB) of a process and its children.
rss_kib() {
  local total=0 p
  for p in $(e2e_tree "$1"); do
    [ -r "/proc/$p/status" ] || continue
    total=$((total + $(awk '/^VmRSS:/ {print $2}' "/proc/$p/status")))
  done
  echo "$total"
}

# Established connections from the proxy (any of its processes) to the backends.
backend_conns() {
  local pids
  pids="$(e2e_tree "$1" | paste -sd'|')"
  ss -Htnp state established "( dport = :${B1##*:} or dport = :${B2##*:} or dport = :${B3##*:} )" \
    | grep -cE "pid=($pids)," || true
}

# One target: prints "rss_before_kib rss_after_kib per_conn_kib open failed backend_conns
# closed_while_idle open_seconds".
measure() {
  local t="$1" pid="${PID[$1]}" addr="${NAME[$1]}" line before after conns closed
  python3 "$CLIENT" "$addr" "$WARMUP" "$CONCURRENCY" close >/dev/null
  sleep 1
  before="$(rss_kib "$pid")"
  coproc CLIENT_PROC { python3 "$CLIENT" "$addr" "$N" "$CONCURRENCY"; }
  read -r line <&"${CLIENT_PROC[0]}"
  sleep "$SETTLE"
  after="$(rss_kib "$pid")"
  conns="$(backend_conns "$pid")"
  # Ask the client how many the proxy closed meanwhile; it then closes everything.
  echo stop >&"${CLIENT_PROC[1]}"
  read -r closed <&"${CLIENT_PROC[0]}"
  wait "$CLIENT_PROC_PID" 2>/dev/null || true
  local open failed secs
  open="$(sed -E 's/.*open=([0-9]+).*/\1/' <<<"$line")"
  failed="$(sed -E 's/.*failed=([0-9]+).*/\1/' <<<"$line")"
  secs="$(sed -E 's/.*seconds=([0-9.]+).*/\1/' <<<"$line")"
  echo "$before $after $(awk -v a="$after" -v b="$before" -v n="$N" 'BEGIN {printf "%.2f", (a - b) / n}') \
$open $failed $conns ${closed#closed_while_idle=} $secs"
}

start_all() {
  PIDS=()
  e2e_backends
  e2e_nginx_proxy proxy "$NGX"
  PID[nginx]=$E2E_PID
  # `no strict-limits`: HAProxy runs (with a warning) when the file-descriptor limit is below
  # the 2 × maxconn it reserves, as for 10 000 idle clients under a hard limit of 20 000.
  e2e_haproxy "$HAP" "" "no strict-limits"
  PID[haproxy]=$E2E_PID
  e2e_lbkit_proxies_up
}

stop_all() {
  for pid in "${PIDS[@]:-}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  sleep 1
}

: > "$WORK/results"
for r in $(seq 1 "$ROUNDS"); do
  start_all
  # Rotate the order so that no target is always first.
  order=("${TARGETS[@]:$(( (r - 1) % ${#TARGETS[@]} ))}" "${TARGETS[@]:0:$(( (r - 1) % ${#TARGETS[@]} ))}")
  for t in "${order[@]}"; do
    res="$(measure "$t")"
    echo "$t $res" >> "$WORK/results"
    echo "round $r  $t: $res   (rss-before rss-after KiB/conn open failed backend-conns closed-while-idle open-s)" >&2
    sleep 1
  done
  stop_all
done

echo
echo "Machine: $(nproc) cores, $(uname -sr); N=$N idle keep-alive connections (one GET each), $ROUNDS rounds, medians."
echo "Proxies: $WORKERS worker thread/process each, round robin over 3 nginx backends, keep-alive."
echo
echo "| target | RSS before, MiB | RSS with N idle, MiB | KiB per idle connection | vs nginx | connections to backends | failed / closed while idle |"
echo "|---|---|---|---|---|---|---|"
col() { e2e_col "$WORK/results" "$1" "$2"; }
NG="$(col nginx 4)"
for t in "${TARGETS[@]}"; do
  printf "| %s | %.1f | %.1f | %s | %.1f× | %s | %s / %s |\n" "$t" \
    "$(awk -v k="$(col "$t" 2)" 'BEGIN {print k / 1024}')" \
    "$(awk -v k="$(col "$t" 3)" 'BEGIN {print k / 1024}')" \
    "$(col "$t" 4)" "$(awk -v a="$(col "$t" 4)" -v b="$NG" 'BEGIN {print (b > 0 ? a / b : 0)}')" \
    "$(col "$t" 7)" "$(col "$t" 6)" "$(col "$t" 8)"
done
