#!/usr/bin/env python3
"""Fails when the top-level modules of src/ import each other in a circle.

An edge X -> Y is a `crate::Y` path in the non-test code of module X (src/X.rs or src/X/**).
Comments and doc links are skipped; so is everything from a `#[cfg(test)]` line on in a file
(the test modules sit at the end of each file). The graph must be acyclic: the module graph
runs one way, bottom to top (DESIGN.md).
"""
import pathlib
import re
import sys

src = pathlib.Path(__file__).resolve().parent.parent / "src"
edges = {}
for path in src.rglob("*.rs"):
    rel = path.relative_to(src)
    top = rel.parts[0].removesuffix(".rs")
    if top in ("lib", "main"):
        continue
    text = path.read_text()
    cut = text.find("#[cfg(test)]")
    if cut >= 0:
        text = text[:cut]
    for line in text.splitlines():
        code = line.split("//", 1)[0]
        for used in re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", code):
            if used != top:
                edges.setdefault(top, {}).setdefault(used, set()).add(str(rel))

# Tarjan's strongly connected components.
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
nodes = set(edges) | {d for ds in edges.values() for d in ds}


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, {}):
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))


for n in sorted(nodes):
    if n not in index:
        visit(n)

if sccs:
    for comp in sccs:
        print("module cycle: " + " <-> ".join(comp))
        for a in comp:
            for b, files in sorted(edges.get(a, {}).items()):
                if b in comp:
                    print(f"  {a} -> {b}: {', '.join(sorted(files))}")
    sys.exit(1)
print(f"{len(nodes)} top-level modules, {sum(len(d) for d in edges.values())} edges, no cycle")
