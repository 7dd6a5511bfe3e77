"""The package layout: every import of raylm's own modules, those inside functions included, points
down the layers below (a lazy import hides a circle from Python, not from a reader), and the module
graph has no circle."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent / "raylm"

# Bottom to top. A module may import its own package's modules and those of lower layers. spec and
# methods are one layer of declarations: a method module declares its own spec block (as PEFT's tuners
# declare their configs) and imports only raylm.spec.sections besides other methods.
LAYERS = [
    {"spec", "methods"},
    {"data"},
    {"planning"},
    {"runtime"},
    {"train"},
    {"compress"},
    {"tune", "infer"},
    {"serve", "evaluate", "report"},
    {"kinds"},
    {"pipeline"},
    {"submit"},
    {"cli"},
    {"__main__"},
]
TOP_LEVEL_MODULES = {"__init__", "__main__", "cli", "kinds", "submit"}


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def edges() -> dict[str, set[str]]:
    """module -> the raylm modules it imports anywhere in its text (a package counts as its
    __init__; `from pkg import submodule` as the submodule, and every package above it as well)."""
    known = modules()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.level == 0, f"{name}: relative import"
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in known else node.module)
        found = {r for t in targets if t.startswith("raylm") and (r := resolve(t)) not in (None, name)}
        # importing a.b.c runs a/b/__init__.py first: an edge to every package above a target, but for
        # the importer's own packages (already being imported when it runs)
        own = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        parents = {m.rsplit(".", i)[0] for m in found for i in range(1, m.count(".") + 1)}
        graph[name] = found | {p for p in parents - own if p in known and p not in ("raylm", name)}
    return graph


def layer(module: str) -> int:
    top = module.split(".")[1] if module != "raylm" else "__init__"
    return next(i for i, group in enumerate(LAYERS) if top in group)


def test_the_top_level_is_packages_and_entry_modules():
    loose = {p.stem for p in ROOT.glob("*.py")}
    assert loose == TOP_LEVEL_MODULES
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages == set().union(*LAYERS) - loose


def test_no_import_points_up_a_layer():
    upward = [
        f"{src} -> {dst}"
        for src, targets in edges().items()
        for dst in targets
        if src != "raylm" and dst != "raylm" and layer(dst) > layer(src)
    ]
    assert not upward, "\n".join(upward)


def test_methods_import_only_the_section_base_from_the_spec():
    graph = edges()
    reached = {dst for src, targets in graph.items() if src.startswith("raylm.methods") for dst in targets}
    assert {m for m in reached if not m.startswith("raylm.methods")} == {"raylm.spec", "raylm.spec.sections"}


def test_no_import_circle():
    graph = edges()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state:
            circle = visit(start)
            assert circle is None, " -> ".join(circle)
