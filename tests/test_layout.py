"""The package's import graph: no cycles, no edge from an earlier stage to a later one, and
shared modules import no stage (the folder tree is the pipeline: cache < train < diff < steer,
then the optional compare < experiments, which may import every stage before them)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "saediff"
STAGES = ["cache", "train", "diff", "steer", "compare", "experiments"]
REQUIRED = STAGES[:4]  # compare and experiments are later, optional stages
# top-level parts allowed to use every stage: the CLI, the demo, the organism's builders
DRIVERS = {"cli", "demo", "__main__", "organism"}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every saediff module `name` imports, also inside functions, resolved to a module."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    out = set()
    for m in found:
        while m and m not in mods:
            m = m.rpartition(".")[0]
        if m and m != name and m != "saediff":
            out.add(m)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, mods) for n, p in mods.items()}


def _stage(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def find_problems(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for a, deps in graph.items():
        for b in deps:
            sa, sb = _stage(a), _stage(b)
            if sa and sb and STAGES.index(sb) > STAGES.index(sa):
                problems.append(f"back-edge {a} -> {b}")
            top = a.split(".")[1] if "." in a else ""
            # `saediff/__init__` is the API facade: it binds every stage's entry point
            if sa is None and sb and top not in DRIVERS and a != "saediff":
                problems.append(f"shared module imports a stage: {a} -> {b}")
    # cycles: depth-first search with colours
    colour: dict[str, int] = {}

    def visit(v: str, stack: list[str]) -> None:
        colour[v] = 1
        for w in sorted(graph.get(v, ())):
            if colour.get(w) == 1:
                problems.append("cycle: " + " -> ".join(stack[stack.index(w):] + [v, w])
                                if w in stack else f"cycle through {v} -> {w}")
            elif w not in colour:
                visit(w, stack + [v])
        colour[v] = 2

    for v in sorted(graph):
        if v not in colour:
            visit(v, [])
    return problems


def test_every_stage_is_a_subpackage():
    assert all((ROOT / s / "__init__.py").is_file() for s in REQUIRED)


def test_import_graph_has_no_cycle_and_no_back_edge():
    graph = _graph()
    assert len(graph) > 30  # the walk really found the package
    assert find_problems(graph) == []


@pytest.mark.parametrize("graph, expected", [
    ({"saediff.cache.writer": {"saediff.steer.hooks"}, "saediff.steer.hooks": set()}, "back-edge"),
    ({"saediff.models": {"saediff.train.loop"}, "saediff.train.loop": set()}, "shared module"),
    ({"saediff.a": {"saediff.b"}, "saediff.b": {"saediff.a"}}, "cycle"),
    ({"saediff.steer.hooks": {"saediff.experiments.icl"}, "saediff.experiments.icl": set()},
     "back-edge"),
    ({"saediff.steer.sweep": {"saediff.compare.run"}, "saediff.compare.run": set()}, "back-edge"),
])
def test_the_checker_catches_each_kind_of_problem(graph, expected):
    assert any(p.startswith(expected) for p in find_problems(graph))
