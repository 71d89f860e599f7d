"""The committed example notebooks are what tools/make_examples.py writes: every cell's kind,
source and tags (outputs come from executing them; nbval checks those)."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat as nbf
import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
import make_examples  # noqa: E402


@pytest.mark.parametrize("name", sorted(make_examples.NOTEBOOKS))
def test_the_committed_notebook_is_what_the_tool_writes(name):
    committed = nbf.read(make_examples.EXAMPLES / f"{name}.ipynb", as_version=4)
    cells = make_examples.NOTEBOOKS[name]()

    def shape(cell):
        return cell.cell_type, cell.source, cell.metadata.get("tags")

    assert [shape(c) for c in committed.cells] == [shape(c) for c in cells], \
        f"examples/{name}.ipynb differs from tools/make_examples.py: rerun it with --execute"
