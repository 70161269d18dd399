"""The package's import structure (docs/DESIGN.md): imports go one way down the layers, no cycles.

Lazy imports inside functions count too: a cycle through them still ties the modules together."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "latentr3"

# A module may import its own layer and the layers before it (config and atomic: every layer).
LAYERS = [{"config", "atomic", "__init__"}, {"data"}, {"model", "baselines"}, {"decoding"},
          {"evaluation"}, {"training"}, {"pipeline", "recommend", "serving", "plots"}, {"cli", "__main__"}]


def _modules() -> dict[str, Path]:
    return {".".join(f.relative_to(SRC.parent).with_suffix("").parts): f for f in SRC.rglob("*.py")}


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges = {}
    for name, f in mods.items():
        pkg = name.split(".")[:-1] if f.name != "__init__.py" else name.split(".")
        out = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg[:len(pkg) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for cand in [target] + [f"{target}.{a.name}" for a in node.names]:
                    for m in (cand, cand + ".__init__"):
                        if m in mods and m != name:
                            out.add(m)
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in mods}
        edges[name] = out
    return edges


def _layer(module: str) -> int:
    part = module.split(".")[1]
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_imports_go_down_the_layers():
    edges = _imports(_modules())
    assert len(edges) > 30
    upward = sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs if _layer(b) > _layer(a))
    assert not upward, upward


def test_no_import_cycles():
    edges = _imports(_modules())
    seen, on_path, cycles = set(), [], []

    def visit(v):
        if v in on_path:
            cycles.append(on_path[on_path.index(v):] + [v])
            return
        if v in seen:
            return
        seen.add(v)
        on_path.append(v)
        for w in sorted(edges[v]):
            visit(w)
        on_path.pop()

    for v in sorted(edges):
        visit(v)
    assert not cycles, cycles
