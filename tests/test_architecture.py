"""The layout promises: imports point one way, modules stay small, `import` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import import_graph  # noqa: E402


def test_the_import_graph_has_no_cycle():
    edges = import_graph.graph()
    assert import_graph.find_cycle(edges) is None
    assert "ipy_intervene.runtime.run" in edges["ipy_intervene.tracing.trace"] or \
        "ipy_intervene.runtime" in edges["ipy_intervene.tracing.trace"]


def test_the_cycle_finder_finds_a_cycle():
    assert import_graph.find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_import_points_down_the_layers():
    assert import_graph.upward(import_graph.graph()) == []


def test_the_layer_check_finds_an_upward_import_and_type_checking_imports_count(tmp_path):
    layers = [("top",), ("bottom",)]
    assert import_graph.upward({"p.bottom.x": {"p.top.y"}, "p.top.y": {"p.bottom.x"}},
                               layers) == [("p.bottom.x", "p.top.y")]
    code = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ipy_intervene.x import y\n"
    import ast
    assert len(import_graph._imports(ast.parse(code))) == 2


def test_every_module_is_in_a_layer_and_the_root_holds_only_the_surface():
    for module in import_graph.graph():
        import_graph.layer(module)            # raises for a module in no layer
    loose = sorted(p.name for p in (ROOT / "ipy_intervene").glob("*.py"))
    assert loose == ["__init__.py", "errors.py", "report.py"]


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "ipy_intervene").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_import_does_not_load_transformers():
    code = "import sys, ipy_intervene; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
