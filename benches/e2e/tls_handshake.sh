#!/usr/bin/env bash
# TLS termination side by side on loopback (issue 22): full handshakes per second (a new
# connection for every request, no resumption), resumed handshakes per second (TLS 1.3 session
# tickets), and requests per second over keep-alive TLS connections, for lbkit's TLS
# termination (examples/tls_termination.rs), nginx and HAProxy 2.6, with the same certificate
# (a self-signed ECDSA P-256 one made here with openssl) in front of the same three HTTP/1.1
# nginx backends as compare.sh.
#
#   bash benches/e2e/tls_handshake.sh              # 3 interleaved rounds of 5 s per measure
#   DURATION=2 ROUNDS=1 bash benches/e2e/tls_handshake.sh
#   WORKERS=1 bash benches/e2e/tls_handshake.sh    # worker threads/processes per proxy (2)
#   CLIENTS=8 bash benches/e2e/tls_handshake.sh    # parallel handshaking clients (default 8)
#   TLS_BIN=/path/to/tls_termination bash benches/e2e/tls_handshake.sh   # not rebuilt
#   PORT=27500 bash benches/e2e/tls_handshake.sh   # backends PORT+1..3, proxies PORT+100..102
#
# Handshakes: CLIENTS `openssl s_time` processes at once, each looping connect, handshake,
# `GET / HTTP/1.0`, read the answer, close: `-new` for full handshakes, `-reuse` for resumed
# ones (the share actually resumed is counted from s_time's marks and printed). Keep-alive:
# h2load --h1, CONNS connections. CPU per handshake (or request) is utime + stime of the
# proxy's processes (all threads; nginx's master and workers) from /proc over the run divided
# by the handshakes (requests) done. All three serve TLS 1.2 and 1.3 with OpenSSL's or rustls'
# defaults (TLS 1.3, X25519 here), ALPN h2 and http/1.1, tickets and a session cache on.
# Medians over the rounds; issue 22's target: lbkit >= 1.0x nginx on full handshakes.
# Everything listens on 127.0.0.1; everything started is stopped on exit.
set -euo pipefail

DURATION="${DURATION:-5}"
ROUNDS="${ROUNDS:-3}"
WORKERS="${WORKERS:-2}"
CLIENTS="${CLIENTS:-8}"
CONNS="${CONNS:-64}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
# shellcheck source=benches/e2e/common.sh
. "$ROOT/benches/e2e/common.sh"
e2e_init tls
e2e_need h2load:nghttp2-client nginx:nginx haproxy:haproxy curl:curl openssl:openssl

e2e_ports "${PORT:-27500}"
declare -A PID
e2e_backends

# --- the certificate all three serve: self-signed ECDSA P-256 for localhost and 127.0.0.1.
mkdir -p "$WORK/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" 2>/dev/null
cat "$WORK/tls/cert.pem" "$WORK/tls/key.pem" > "$WORK/tls/haproxy.pem"

# --- nginx terminating TLS.
e2e_nginx_proxy nginx "$NGX ssl http2" "ssl_certificate $WORK/tls/cert.pem;
    ssl_certificate_key $WORK/tls/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    ssl_session_tickets on;"
PID[nginx]=$E2E_PID

# --- HAProxy terminating TLS (its session cache and tickets are on by default).
e2e_haproxy "$HAP ssl crt $WORK/tls/haproxy.pem alpn h2,http/1.1" "" \
  "ssl-default-bind-options ssl-min-ver TLSv1.2"
PID[haproxy]=$E2E_PID

# --- lbkit: examples/tls_termination with this certificate, over the same backends.
TLS_BIN="$(e2e_example tls_termination "${TLS_BIN:-}")"
RUST_LOG=error "$TLS_BIN" --listen "$LBKIT" --cert "$WORK/tls/cert.pem" \
  --key "$WORK/tls/key.pem" --backends "$B1,$B2,$B3" --threads "$WORKERS" >/dev/null 2>&1 &
PIDS+=($!); PID[lbkit]=$!

for a in $B1 $B2 $B3; do e2e_wait_up "http://$a/"; done
for a in $LBKIT $NGX $HAP; do e2e_wait_up "https://$a/" --cacert "$WORK/tls/cert.pem"; done

declare -A ADDR=([lbkit]=$LBKIT [haproxy]=$HAP [nginx]=$NGX)
ORDER=(lbkit nginx haproxy)

now() { date +%s.%N; }

# CLIENTS s_time loops against proxy $1 in mode $2 (new or reuse) for DURATION s; prints
# "handshakes/s cpu_us_per_handshake resumed_percent".
handshakes() {
  local t="$1" mode="$2" pid="${PID[$1]}" t0 t1 w0 w1 i n r marks
  local pids=()
  rm -f "$WORK"/stime.*
  t0="$(e2e_ticks "$pid")"; w0="$(now)"
  for i in $(seq 1 "$CLIENTS"); do
    timeout $((DURATION + 20)) openssl s_time -connect "${ADDR[$t]}" "-$mode" -www / \
      -time "$DURATION" > "$WORK/stime.$i" 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || true; done
  w1="$(now)"; t1="$(e2e_ticks "$pid")"
  n="$(cat "$WORK"/stime.* | awk '/connections in .* real seconds/ {n += $1} END {print n + 0}')"
  r="$(cat "$WORK"/stime.* | grep -E '^[r*t3]+$' | tr -cd r | wc -c || true)"
  marks="$(cat "$WORK"/stime.* | grep -E '^[r*t3]+$' | tr -cd 'r*t3' | wc -c || true)"
  if [ "$n" -eq 0 ]; then
    echo "s_time -$mode against $t made no connection:" >&2
    cat "$WORK/stime.1" >&2
    exit 1
  fi
  echo "$(awk -v n="$n" -v a="$w0" -v b="$w1" 'BEGIN {printf "%.0f", n / (b - a)}') \
$(e2e_cpu_us "$((t1 - t0))" "$n") \
$(awk -v r="$r" -v m="$marks" 'BEGIN {if (m > 0) printf "%.0f", 100 * r / m; else print 0}')"
}

# h2load over CONNS keep-alive HTTP/1.1 TLS connections to proxy $1; prints
# "requests/s cpu_us_per_request failed".
keepalive() {
  local t="$1" pid="${PID[$1]}" t0 t1 out rps ok failed
  t0="$(e2e_ticks "$pid")"
  out="$(h2load --h1 -c"$CONNS" -D "$DURATION" "https://${ADDR[$t]}/" 2>&1)" || true
  t1="$(e2e_ticks "$pid")"
  rps="$(awk '/^finished in/ {t = $3 + 0} /^status codes:/ {ok = $3}
              END {if (t > 0) printf "%.1f", ok / t}' <<<"$out")"
  ok="$(awk '/^status codes:/ {print $3}' <<<"$out")"
  failed="$(awk '/^requests:/ {n += $10 + $12 + $14} /^status codes:/ {n += $7 + $9}
                 END {print n + 0}' <<<"$out")"
  if [ -z "$rps" ] || [ -z "$ok" ]; then
    echo "h2load against $t failed:" >&2
    echo "$out" >&2
    exit 1
  fi
  echo "$rps $(e2e_cpu_us "$((t1 - t0))" "$ok") $failed"
}

echo "negotiated with openssl s_client:" >&2
for t in "${ORDER[@]}"; do
  echo "  $t: $(openssl s_client -connect "${ADDR[$t]}" </dev/null 2>/dev/null \
    | awk '/^New, / {p = $2 " " $5} /^Server Temp Key/ {k = $4 $5} END {print p, k}')" >&2
done

echo "warming up..." >&2
for t in "${ORDER[@]}"; do
  h2load --h1 -c"$CONNS" -D 1 "https://${ADDR[$t]}/" >/dev/null 2>&1 || true
done

# The three measures of proxy $1, one after the other: the full handshakes' "rate cpu resumed%",
# the resumed ones', keep-alive's "rps cpu failed".
measure() {
  local full resumed ka
  full="$(handshakes "$1" new)" || exit 1
  resumed="$(handshakes "$1" reuse)" || exit 1
  ka="$(keepalive "$1")" || exit 1
  echo "$full $resumed $ka"
}
e2e_rounds "full: hs/s cpu-us resumed% | resumed: hs/s cpu-us resumed% | keep-alive: rps cpu-us failed"

R="$WORK/results"
echo
echo "Machine: $(nproc) cores, $(uname -sr), $(openssl version | cut -d' ' -f1-2); $ROUNDS rounds"
echo "interleaved, medians. Handshakes: $CLIENTS openssl s_time clients at once for ${DURATION} s, one"
echo "GET / HTTP/1.0 per connection. Keep-alive: h2load --h1 -c$CONNS -D $DURATION. Proxies: $WORKERS"
echo "worker threads/processes each, round robin over 3 HTTP/1.1 nginx backends, keep-alive."
echo
echo "| proxy | full handshakes/s | CPU µs/full handshake | resumed handshakes/s | resumed share | CPU µs/resumed | keep-alive requests/s | CPU µs/request | full vs nginx |"
echo "|---|---|---|---|---|---|---|---|---|"
NG_FULL="$(e2e_col "$R" nginx 2)"
for t in "${ORDER[@]}"; do
  full="$(e2e_col "$R" "$t" 2)"
  printf "| %s | %.0f | %s | %.0f | %s %% | %s | %.0f | %s | %s |\n" "$t" "$full" \
    "$(e2e_col "$R" "$t" 3)" "$(e2e_col "$R" "$t" 5)" "$(e2e_col "$R" "$t" 7)" \
    "$(e2e_col "$R" "$t" 6)" "$(e2e_col "$R" "$t" 8)" "$(e2e_col "$R" "$t" 9)" \
    "$(e2e_ratio "$full" "$NG_FULL")"
done
FAILED="$(awk '{n += $10} END {print n + 0}' "$R")"
[ "$FAILED" -gt 0 ] && echo && echo "keep-alive requests failed: $FAILED"
RATIO="$(e2e_ratio "$(e2e_col "$R" lbkit 2)" "$NG_FULL")"
if awk -v r="$RATIO" 'BEGIN {exit !(r >= 1.0)}'; then
  echo; echo "issue 22 target (lbkit >= 1.0x nginx full handshakes/s): met (${RATIO}x)"
else
  echo; echo "issue 22 target (lbkit >= 1.0x nginx full handshakes/s): missed (${RATIO}x)"
fi
