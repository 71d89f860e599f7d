"""Check the package's layers: no import cycle, and every import points down the layers.

    python tools/import_graph.py          # exit 1 on a cycle or an upward import

Every import counts: those inside functions (a lazy import is still a dependency) and those
under ``if TYPE_CHECKING:`` (a type is a dependency too). ``from pkg import mod`` counts as a
dependency on ``pkg.mod``; a package's own ``__init__`` imported from inside it is not
counted. :data:`LAYERS` lists the layers from the top; a module may import its own layer's
modules (without a cycle) and any layer below, never one above.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "ipy_intervene"

#: Top to bottom; each entry is one layer: the packages (or modules) in it.
LAYERS: list[tuple[str, ...]] = [
    ("ipy_intervene", "magics", "report", "demo"),   # the notebook's surface and the demo
    ("circuit",),                                    # EAP, edge graphs, circuit runs
    ("sweep",),                                      # patching engines
    ("edits",),                                      # edits that last (%%trace --edit)
    ("features",),                                   # dictionaries spliced as sites
    ("analysis",),                                   # cache, lens, patterns, decompose, metrics
    ("tracing",),                                    # the %%trace pipeline
    ("widgets",),                                    # views and the static renderer
    ("runtime",),                                    # one forward with greenlets
    ("compiler",),                                   # cell AST -> graph + code
    ("model",),                                      # the live module tree and its inputs
    ("habits",),                                     # other tools' habits, as errors
    ("arch",),                                       # everything about a model family
    ("infra",),                                      # hook lifetime, run context, interrupts
    ("errors",),                                     # one exception family
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> list[ast.stmt]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ipy_intervene"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & files.keys()
                deps |= subs or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("ipy_intervene")}
        edges[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def layer(module: str, layers: list[tuple[str, ...]] = LAYERS) -> int:
    """The index (0: top) of the layer that holds ``module``.

    >>> layer("ipy_intervene.sweep.api"), layer("ipy_intervene.errors"), layer("ipy_intervene")
    (2, 13, 0)
    """
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else parts[0]
    for index, members in enumerate(layers):
        if name in members:
            return index
    raise KeyError(f"{module} is in no layer of tools/import_graph.py's LAYERS: add it")


def upward(edges: dict[str, set[str]],
           layers: list[tuple[str, ...]] = LAYERS) -> list[tuple[str, str]]:
    """Every import of a module from a layer above its own: ``(importer, imported)``."""
    return sorted((module, dep) for module, deps in edges.items() for dep in deps
                  if layer(dep, layers) < layer(module, layers))


if __name__ == "__main__":
    edges = graph()
    cycle = find_cycle(edges)
    wrong = upward(edges)
    print("import cycle: " + " -> ".join(cycle) if cycle else "no import cycle")
    for module, dep in wrong:
        print(f"upward import: {module} -> {dep}")
    if not wrong:
        print("every import points down the layers")
    sys.exit(1 if cycle or wrong else 0)
