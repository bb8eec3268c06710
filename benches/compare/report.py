#!/usr/bin/env python3
"""Prints the tables of BENCHMARKS.md from criterion's saved estimates (target/criterion, or
the directory given as the first argument).

The time of a case is criterion's typical estimate, the one it prints in the middle of
`time: [low typical high]`: the slope of the linear fit for linear sampling, the mean for
flat sampling. Ratios are lbkit / other: below 0.5 meets the "at most half" target.
"""
import json
import os
import sys

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "target", "criterion"
)
SIZES = [10, 100, 1000, 10000]


def ns(group, bench, param):
    path = os.path.join(ROOT, group, bench, str(param), "new", "estimates.json")
    try:
        with open(path) as f:
            est = json.load(f)
    except FileNotFoundError:
        return None
    typical = est.get("slope") or est["mean"]
    return typical["point_estimate"]


def fmt(t):
    if t is None:
        return "–"
    if t >= 1e6:
        return f"{t / 1e6:.2f} ms"
    if t >= 1e3:
        return f"{t / 1e3:.2f} µs"
    return f"{t:.1f} ns"


def ratio(a, b):
    return None if a is None or b is None else a / b


def fr(r, target=0.5):
    if r is None:
        return "–"
    return f"{r:.2f} {'met' if r <= target else '**missed**'}"


def table(head, rows):
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()


def pair_table(group, lb_extra, ours, theirs, their_label):
    head = ["endpoints"] + [b for b in lb_extra] + [ours, their_label, f"{ours} / {their_label}"]
    rows = []
    for n in SIZES:
        extra = [fmt(ns(group, b, n)) for b in lb_extra]
        a, b = ns(group, ours, n), ns(group, theirs, n)
        rows.append([f"{n:,}".replace(",", " ")] + extra + [fmt(a), fmt(b), fr(ratio(a, b))])
    print(f"**{group}**\n")
    table(head, rows)


def flat(label, group, bench):
    a, b = ns(group, bench, 10), ns(group, bench, 10000)
    r = ratio(b, a)
    verdict = "–" if r is None else ("flat (met)" if r <= 1.5 else "**not flat (missed)**")
    return [label, fmt(a), fmt(b), "–" if r is None else f"{r:.2f}×", verdict]


def main():
    if not os.path.isdir(ROOT):
        sys.exit("no criterion results: run `cargo bench` in benches/compare first")
    pair_table("p2c", ["lbkit_pick"], "lbkit_call", "tower_call", "tower_call")
    pair_table("peak_ewma", ["lbkit_pick"], "lbkit_call", "tower_call", "tower_call")
    pair_table("round_robin", [], "lbkit_pick", "pingora_select", "pingora_select")

    print("**hash** (a new 16-byte key per pick)\n")
    rows = []
    for n in SIZES:
        m, r, k = ns("hash", "lbkit_maglev", n), ns("hash", "lbkit_ring", n), ns("hash", "pingora_ketama", n)
        rows.append([f"{n:,}".replace(",", " "), fmt(m), fmt(r), fmt(k), fr(ratio(m, k)), fr(ratio(r, k))])
    table(["endpoints", "lbkit_maglev", "lbkit_ring", "pingora_ketama", "maglev / ketama", "ring / ketama"], rows)
    small = ns("hash", "lbkit_maglev_65537_slots", 10000)
    if small is not None:
        print(f"Maglev with a 65 537-slot table at 10 000 endpoints: {fmt(small)}.\n")

    print("**flatness** (10 000 endpoints against 10; target: at most 1.5×)\n")
    table(
        ["case", "10", "10 000", "10 000 / 10", "verdict"],
        [
            flat("round robin, lbkit_pick", "round_robin", "lbkit_pick"),
            flat("p2c, lbkit_pick", "p2c", "lbkit_pick"),
            flat("p2c, lbkit_call", "p2c", "lbkit_call"),
            flat("maglev, lbkit_maglev (hashed)", "hash", "lbkit_maglev"),
            flat("(tower p2c, tower_call)", "p2c", "tower_call"),
            flat("(pingora round robin)", "round_robin", "pingora_select"),
            flat("(pingora ketama)", "hash", "pingora_ketama"),
        ],
    )

    print("**update** (one endpoint added to 10 000 and removed again: two changes)\n")
    rows = []
    for b in ["lbkit_round_robin", "lbkit_p2c", "lbkit_peak_ewma", "lbkit_maglev", "lbkit_ring",
              "tower_p2c", "tower_peak_ewma", "pingora_round_robin", "pingora_ketama"]:
        t = ns("update", b, 10000)
        rows.append([b, fmt(t), fmt(None if t is None else t / 2)])
    table(["implementation", "insert + remove", "per change"], rows)

    print("**threads** (1 000 endpoints, one shared balancer; total picks per second)\n")
    rows = []
    for b in ["lbkit_p2c", "lbkit_round_robin", "lbkit_maglev", "pingora_round_robin", "pingora_ketama",
              "lbkit_call_tasks", "tower_buffer_tasks"]:
        cells = []
        for k in [1, 2, 4]:
            t = ns("threads", b, k)  # time of one round: one pick on each of k threads
            cells.append("–" if t is None else f"{k / t * 1e3:.1f} M/s")
        rows.append([b] + cells)
    table(["implementation", "1 thread", "2 threads", "4 threads"], rows)
    rows = []
    for ours, theirs in [("lbkit_round_robin", "pingora_round_robin"), ("lbkit_maglev", "pingora_ketama"),
                         ("lbkit_call_tasks", "tower_buffer_tasks")]:
        cells = []
        for k in [1, 2, 4]:
            a, b = ns("threads", ours, k), ns("threads", theirs, k)
            cells.append(fr(ratio(a, b)))
        rows.append([f"{ours} / {theirs} (time per pick)"] + cells)
    table(["pair", "1 thread", "2 threads", "4 threads"], rows)


if __name__ == "__main__":
    main()
