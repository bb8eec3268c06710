"""Checks that no dependency of the library (every feature on, Linux targets) declares a
rust-version above the crate's own: the README's MSRV stays true as the lock moves.

Reads `cargo metadata --all-features` on stdin."""
import json
import sys

meta = json.load(sys.stdin)
pkgs = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
root = meta["resolve"]["root"]


def version(v):
    parts = [int(x) for x in (v or "0").split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def platform_ok(kind):
    target = kind.get("target") or ""
    return "windows" not in target and "wasm" not in target


ours = version(pkgs[root]["rust_version"])
seen, stack = set(), [root]
while stack:
    node = stack.pop()
    for dep in nodes[node]["deps"]:
        kinds = [k for k in dep["dep_kinds"] if k["kind"] != "dev" and platform_ok(k)]
        if not kinds or dep["pkg"] in seen:
            continue
        seen.add(dep["pkg"])
        stack.append(dep["pkg"])

too_new = sorted(
    (pkgs[i]["name"], pkgs[i]["version"], pkgs[i]["rust_version"])
    for i in seen
    if version(pkgs[i].get("rust_version")) > ours
)
if too_new:
    print(f"rust-version {pkgs[root]['rust_version']} is not true; these need more:")
    for name, ver, rv in too_new:
        print(f"  {name} {ver}: rust {rv}")
    sys.exit(1)
print(f"{len(seen)} library dependencies, none needs more than rust {pkgs[root]['rust_version']}")
