"""The package layout is the pipeline: the parts import each other in one direction only, and the knowledge of a
model family's layout (where its decoder layers are) lives in models/families.py alone."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).parent.parent / "src" / "svdllm"


def _unit(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports() -> dict[str, set[str]]:
    """part -> the other parts it imports (a part: a sub-package, or a module at the top)."""
    edges: dict[str, set[str]] = {}
    for f in ROOT.rglob("*.py"):
        unit, pkg = _unit(f), list(f.relative_to(ROOT).parts[:-1])
        for node in ast.walk(ast.parse(f.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = pkg[: len(pkg) - (node.level - 1)]
            mod = base + (node.module.split(".") if node.module else [])
            targets = [mod[0]] if mod else [a.name for a in node.names]
            edges.setdefault(unit, set()).update(t for t in targets if t not in (unit, "__init__", "__version__"))
    return edges


def test_the_parts_import_each_other_without_a_cycle():
    edges = _imports()
    state: dict[str, int] = {}

    def visit(u, path):
        state[u] = 1
        for v in edges.get(u, ()):
            assert state.get(v) != 1, f"import cycle: {' -> '.join(path + [u, v])}"
            if v not in state:
                visit(v, path + [u])
        state[u] = 2

    for u in list(edges):
        if u not in state:
            visit(u, [])


def test_each_part_imports_only_what_it_should():
    edges = _imports()
    # allocators see only spectra and the budget; models know architectures and loading, nothing of compression
    # (quantization: only its pricing of a width, quantization/pricing.py, which imports nothing of svdllm)
    assert edges.get("allocation", set()) <= {"errors", "quantization"}
    assert edges.get("models", set()) <= {"errors", "utils"}
    assert edges.get("data", set()) <= {"errors"}
    # only the entry points sequence a run
    assert {u for u, vs in edges.items() if "pipeline" in vs} <= {"__init__", "cli"}
    for part in ("calibration", "factorization", "allocation", "update", "io", "models", "evaluation"):
        assert not edges.get(part, set()) & {"pipeline", "cli", "config"}, part


def test_only_the_families_spell_out_where_the_decoder_layers_are():
    offenders = []
    for f in ROOT.rglob("*.py"):
        if f.name == "families.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "model.layers" in node.value:
                if not (node.value.strip().startswith(("e.g.", "(")) or "\n" in node.value):  # docstrings may say it
                    offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, offenders


def test_allocation_reads_only_the_price_of_a_width_from_quantization():
    for f in (ROOT / "allocation").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and (node.module or "").startswith("quantization"):
                assert node.module == "quantization.pricing", f"{f.name} imports {node.module}"
    pricing = ast.parse((ROOT / "quantization" / "pricing.py").read_text())
    assert not [n for n in ast.walk(pricing) if isinstance(n, ast.ImportFrom) and n.level], "pricing.py must stay a leaf"


def test_the_top_of_the_package_holds_only_the_entry_points():
    """Every stage is a package named after it; at the top only the entry points, the configs and the error type."""
    loose = sorted(f.name for f in ROOT.glob("*.py"))
    assert loose == ["__init__.py", "cli.py", "config.py", "errors.py", "pipeline.py"], loose


def test_the_walk_and_the_statistics_know_nothing_of_what_is_done_with_them():
    """calibration/ (the walks, the statistics) imports no stage after it, and factorization/ no update: the update
    reaches the factorizer as a function the orchestrator hands it."""
    edges = _imports()
    later = {"factorization", "allocation", "update", "quantization", "io", "evaluation", "nn"}
    assert not edges.get("calibration", set()) & later, edges.get("calibration")
    assert "update" not in edges.get("factorization", set())
