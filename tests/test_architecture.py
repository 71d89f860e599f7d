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
    assert "ipy_intervene.runtime.run" in edges["ipy_intervene.trace"] or \
        "ipy_intervene.runtime" in edges["ipy_intervene.trace"]


def test_the_cycle_finder_finds_a_cycle():
    assert import_graph.find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_model_tree_does_not_import_the_runtime():
    edges = import_graph.graph()
    assert not any(dep.startswith("ipy_intervene.runtime") for dep in edges["ipy_intervene.model"])


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "ipy_intervene").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_import_does_not_load_transformers():
    code = "import sys, ipy_intervene; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
