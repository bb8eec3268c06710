#!/usr/bin/env python3
"""Counts lbkit's public surface from the rustdoc HTML (`cargo doc --no-deps --all-features`).

items:   entries of target/doc/lbkit/all.html (structs, enums, traits, functions, type aliases,
         constants, macros), each at the one path rustdoc gives it;
methods: inherent public methods on those types plus the methods of public traits (trait
         implementations such as Clone or Service are not counted: they add no name to learn);
Items of other crates that lbkit re-exports are counted apart.
paths:   `pub use` lines that make an item reachable at a second path (rustdoc's "Re-exports").
Usage: python3 .ci/surface.py [target/doc/lbkit] [-v]
"""
import os
import re
import sys

args = [a for a in sys.argv[1:] if not a.startswith("-")]
verbose = "-v" in sys.argv
root = args[0] if args else os.path.join(os.path.dirname(__file__), "..", "target", "doc", "lbkit")
html = open(os.path.join(root, "all.html"), encoding="utf-8").read()
links = re.findall(r'<li><a href="([^"]+)">', html)

methods = 0
per_item = {}
foreign = []
for link in links:
    page = open(os.path.join(root, link), encoding="utf-8").read()
    if "src/lbkit/" not in page:
        # Another crate's item re-exported here (hickory's resolver configuration): counted
        # apart, as its methods are that crate's to learn.
        foreign.append(link)
        continue
    kind = os.path.basename(link).split(".")[0]
    if kind == "trait":
        end = page.find('id="implementors"')
        part = page[: end if end >= 0 else len(page)]
        names = set(re.findall(r'id="(?:ty)?method\.([a-z_0-9]+)"', part))
    elif kind in ("struct", "enum"):
        start = page.find('id="implementations-list"')
        if start < 0:
            names = set()
        else:
            end = page.find('id="trait-implementations"', start)
            part = page[start : end if end >= 0 else len(page)]
            names = set(re.findall(r'id="method\.([a-z_0-9]+)"', part))
    else:
        names = set()
    per_item[link] = len(names)
    methods += len(names)

reexports = 0
for dirpath, _, files in os.walk(root):
    for f in files:
        if f == "index.html":
            page = open(os.path.join(dirpath, f), encoding="utf-8").read()
            start = page.find('id="reexports"')
            if start >= 0:
                end = page.find("</dl>", start)
                reexports += page[start:end].count("<dt")
if verbose:
    for link, n in sorted(per_item.items(), key=lambda kv: -kv[1]):
        print(f"{n:4} {link}")
print(
    f"items {len(links) - len(foreign)}  methods {methods}  second paths {reexports}"
    f"  (and {len(foreign)} items of other crates re-exported)"
)
