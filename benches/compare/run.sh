#!/usr/bin/env bash
# Runs the side-by-side benchmarks of lbkit against tower's p2c balancer and
# pingora-load-balancing, saves criterion's raw output, and prints the tables of BENCHMARKS.md.
#
#   bash benches/compare/run.sh             # everything (about 5 minutes on 2 cores)
#   bash benches/compare/run.sh hash/       # one group (any criterion filter)
#
# System packages: pingora-core always builds flate2 with zlib-ng, whose build script runs
# cmake (and a C compiler). No TLS feature of pingora is turned on, so neither OpenSSL nor
# BoringSSL is needed. cmake is installed with apt when it is missing.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v cmake >/dev/null; then
    echo "installing cmake (pingora-core -> flate2/zlib-ng -> libz-ng-sys needs it)" >&2
    apt-get update -qq
    apt-get install -y -qq cmake
fi
if ! command -v cc >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq build-essential
fi

mkdir -p results
out="results/raw-$(date -u +%Y%m%dT%H%M%SZ).txt"
{
    echo "# $(date -u) | nproc $(nproc) | $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
    echo "# kernel $(uname -r) | $(rustc --version)"
    echo "# lbkit $(git -C ../.. rev-parse --short HEAD) (src changes not committed: $(git -C ../.. status --short -- src | wc -l) files)"
    echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$out"
cargo bench --bench compare -- "$@" 2>&1 | tee -a "$out"
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out"
echo "raw output saved to benches/compare/$out" >&2
python3 report.py
