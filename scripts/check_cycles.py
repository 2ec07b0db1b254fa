#!/usr/bin/env python3
"""Fails when a crate's modules import each other in a circle.

For every crate in the workspace, each source file is a module; a `use` or a
path through `crate::`, `super::` or `self::` is an edge to the module that
defines the item (a name a module re-exports with `pub use` resolves to the
module it comes from). Test modules (`#[cfg(test)]` to the end of a file) are
left out. Prints each circle (strongly connected set of modules) and exits 1
if there is one; `--graph` prints every edge.

    scripts/check_cycles.py [--graph] [CRATE_DIR ...]
"""
import os
import re
import sys

CRATES = ["common", "model", "worker", "coordinator", "rlhfctl"]


def module_of(src, path):
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] in ("lib", "main", "mod"):
        rel = rel[:-1]
    return tuple(rel)


def strip(text):
    text = text.split("#[cfg(test)]")[0]
    return re.sub(r"//[^\n]*", "", text)


def expand(prefix, body):
    """`a::{b, c::{d, e}}` → [a::b, a::c::d, a::c::e]."""
    out, depth, cur = [], 0, ""
    for ch in body + ",":
        if ch == "," and depth == 0:
            item = cur.strip()
            if item:
                m = re.match(r"^([\w:]*?)(?:::)?\{(.*)\}$", item, re.S)
                if m:
                    out += expand(prefix + ([m.group(1)] if m.group(1) else []), m.group(2))
                else:
                    out.append("::".join(prefix + [item.split(" as ")[0].strip()]))
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    return out


def uses(text):
    """Every path a file names: expanded `use` trees and inline paths."""
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        tree = m.group(1).strip()
        paths += expand([], tree) if "{" in tree else [tree.split(" as ")[0].strip()]
    paths += re.findall(r"\b(?:crate|super|self)(?:::\w+)+", text)
    return paths


def reexports(text):
    """`pub use a::b::{X, Y}` → {X: a::b::X, ...}."""
    out = {}
    for m in re.finditer(r"\bpub\s+use\s+([^;]+);", text):
        tree = m.group(1).strip()
        for p in expand([], tree) if "{" in tree else [tree]:
            name = p.split("::")[-1]
            out[name] = p
    return out


def resolve(segs, here, modules, exports, depth=0):
    """The module that defines the item at path `segs`, seen from `here`."""
    if not segs:
        return None
    if segs[0] == "crate":
        base, rest = (), segs[1:]
    elif segs[0] in ("super", "self"):
        base = here
        rest = segs
        while rest and rest[0] in ("super", "self"):
            base = base[:-1] if rest[0] == "super" else base
            rest = rest[1:]
    else:
        return None  # another crate or a local name
    mod = base
    i = 0
    while i < len(rest) and mod + (rest[i],) in modules:
        mod = mod + (rest[i],)
        i += 1
    if i < len(rest) and depth < 8:
        target = exports.get(mod, {}).get(rest[i])
        if target:
            found = resolve(target.split("::"), mod, modules, exports, depth + 1)
            if found is not None:
                return found
    return mod


def sccs(graph):
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def check(crate, show):
    src = os.path.join(crate, "src")
    files = {}
    for root, _, names in os.walk(src):
        for f in names:
            if f.endswith(".rs") and not (root.endswith("bin") or f == "build.rs"):
                p = os.path.join(root, f)
                files[module_of(src, p)] = strip(open(p, encoding="utf-8").read())
    modules = set(files)
    exports = {m: reexports(t) for m, t in files.items()}
    graph = {m: set() for m in modules}
    for m, text in files.items():
        for p in uses(text):
            t = resolve(p.split("::"), m, modules, exports)
            if t is not None and t != m:
                graph[m].add(t)
    name = lambda m: "::".join(("crate",) + m)
    if show:
        for m in sorted(graph):
            for t in sorted(graph[m]):
                print(f"{crate}: {name(m)} -> {name(t)}")
    bad = [c for c in sccs(graph) if len(c) > 1]
    for c in bad:
        print(f"{crate}: import circle among " + ", ".join(sorted(name(m) for m in c)))
    return not bad


def main():
    args = [a for a in sys.argv[1:] if a != "--graph"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    crates = args or [os.path.join(root, c) for c in CRATES]
    ok = all([check(c, "--graph" in sys.argv) for c in crates])
    print("check_cycles: no import circle" if ok else "check_cycles: import circles found")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
