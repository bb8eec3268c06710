#!/usr/bin/env bash
# Instructions per operation of each case of the `profile` harness, counted by valgrind's
# callgrind: a measure that machine noise does not move (it does not see cache misses or the
# latency of atomic instructions, so it complements the wall times of `cargo bench`).
#
#   bash benches/compare/callgrind.sh [ITERATIONS]   # default 20000 per case
#
# Prints a markdown table: instructions per pick (or per call) at each size, and the ratio of
# each lbkit case to the tower or pingora case it is matched with.
set -euo pipefail
cd "$(dirname "$0")"
iters="${1:-20000}"
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake; }
bin=$(cargo bench --bench profile --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "profile" and m.get("executable"):
        print(m["executable"])')
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
count() { # case endpoints -> instructions per iteration
    valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*measured*' \
        --callgrind-out-file="$out/cg.out" "$bin" "$1" "$2" "$iters" >/dev/null 2>&1
    local total
    total=$(callgrind_annotate "$out/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
    echo $((total / iters))
}
pairs=(
    "p2c_lbkit_call p2c_tower_call"
    "p2c_lbkit_pick p2c_tower_call"
    "ewma_lbkit_call ewma_tower_call"
    "ewma_lbkit_pick ewma_tower_call"
    "rr_lbkit_pick rr_pingora"
    "maglev_lbkit ketama_pingora"
    "ring_lbkit ketama_pingora"
)
declare -A ir
echo "| lbkit case | other case | endpoints | lbkit Ir | other Ir | lbkit / other |"
echo "|---|---|---|---|---|---|"
for pair in "${pairs[@]}"; do
    read -r ours theirs <<<"$pair"
    for n in 10 100 1000 10000; do
        [[ -n "${ir[$ours/$n]:-}" ]] || ir[$ours/$n]=$(count "$ours" "$n")
        [[ -n "${ir[$theirs/$n]:-}" ]] || ir[$theirs/$n]=$(count "$theirs" "$n")
        a=${ir[$ours/$n]} b=${ir[$theirs/$n]}
        echo "| $ours | $theirs | $n | $a | $b | $(python3 -c "print(f'{$a / $b:.2f}')") |"
    done
done
