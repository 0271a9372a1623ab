"""How many functions of svdllm loop over the decoder layers: walks (the loop makes a layer resident or runs it, or
hands it on with a yield) and listings (the loop only reads each layer's names or shapes).

A function counts when one of its own `for` loops (not a nested function's) iterates over an expression that calls
`decoder_layers(...)`, names a variable bound to such a call, or takes `range` over the layers (`len(layers)`,
`num_layers`, `len(self.layers)`, `top`), and every such function is listed with its loops. It is a walk if a loop
body calls resident/materialize/release/run_layer/tqdm-wrapped layers, runs a layer, or yields; otherwise a listing.

Usage: python benchmarks/reliability/count_layer_walks.py SRC_DIR [SRC_DIR ...] [--json OUT.json]
(e.g. the src/ of two checkouts: before and after a restructuring)
"""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

RUNS = {"resident", "materialize", "release", "run_layer", "layer_statistics", "walk_backward"}
LAYER_WORDS = {"layers", "num_layers", "top"}


def _calls(node: ast.AST) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            out.add(f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else "")
    return out


def _names(node: ast.AST) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
    return out


def _own_nodes(fn: ast.AST):
    """The nodes of `fn`'s body, not descending into nested functions or classes."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        n = stack.pop()
        yield n
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(n))


def layer_loops(fn: ast.AST) -> list[tuple[int, str]]:
    """(line, 'walk' or 'listing') of each loop of `fn` over the decoder layers."""
    bound = set()
    for n in _own_nodes(fn):
        if isinstance(n, ast.Assign) and "decoder_layers" in _calls(n.value):
            bound |= {t.id for t in n.targets if isinstance(t, ast.Name)}
    found = []
    for n in _own_nodes(fn):
        if not isinstance(n, ast.For):
            continue
        it = n.iter
        over_layers = "decoder_layers" in _calls(it) or _names(it) & bound or \
            ("range" in _calls(it) and _names(it) & (LAYER_WORDS | bound))
        if not over_layers:
            continue
        body = ast.Module(body=n.body, type_ignores=[])
        runs = _calls(body) & RUNS or any(isinstance(b, (ast.Yield, ast.YieldFrom)) for b in ast.walk(body)) or \
            "tqdm" in _calls(it)
        found.append((n.lineno, "walk" if runs else "listing"))
    return found


def count(src: Path) -> dict:
    rows = []
    for f in sorted(src.rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                loops = layer_loops(node)
                if loops:
                    kind = "walk" if any(k == "walk" for _, k in loops) else "listing"
                    rows.append({"function": f"{f.relative_to(src)}:{node.name}", "kind": kind,
                                 "lines": [line for line, _ in loops]})
    return {"src": str(src), "walks": sum(r["kind"] == "walk" for r in rows),
            "listings": sum(r["kind"] == "listing" for r in rows), "functions": rows}


def main(argv: list[str]) -> None:
    out = None
    if "--json" in argv:
        k = argv.index("--json")
        out, argv = argv[k + 1], argv[:k] + argv[k + 2:]
    results = [count(Path(a)) for a in argv]
    for r in results:
        print(f"{r['src']}: {r['walks']} walks, {r['listings']} listings")
        for row in r["functions"]:
            print(f"  {row['kind']:8s} {row['function']} (line {', '.join(map(str, row['lines']))})")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
