"""The README's Python blocks run as written, in order, in a fresh kernel (as a new user
copies them into a notebook), and the numbers its comments quote are the ones they give."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def readme_blocks() -> list[str]:
    return [block.strip() for block in BLOCK.findall(README.read_text())]


def test_the_readme_has_its_tour():
    blocks = readme_blocks()
    assert len(blocks) >= 6
    assert blocks[0].startswith("%load_ext ipy_intervene")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The README's blocks as notebook cells, run top to bottom in a fresh python3 kernel."""
    cells = [nbformat.v4.new_code_cell(block) for block in readme_blocks()]
    cells.append(nbformat.v4.new_code_cell("print(repr(d.top(3)))"))
    notebook = nbformat.v4.new_notebook(cells=cells)
    workdir = tmp_path_factory.mktemp("readme")
    NotebookClient(notebook, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return notebook


def test_every_readme_block_runs_as_written(executed):
    failures = [(i, out.get("ename"), out.get("evalue"))
                for i, cell in enumerate(executed.cells)
                for out in cell.outputs if out.output_type == "error"]
    assert failures == []


def test_the_numbers_the_readme_quotes_are_the_ones_it_gives(executed):
    """`d.top(5)  # [('L1H3', 4.76), ('L1H0', 4.15), ('mlp 1', 3.17), ...]`"""
    quoted = re.search(r"d\.top\(5\)\s+# \[(.*?), \.\.\.\]", README.read_text()).group(1)
    expected = [(name, float(value)) for name, value in
                re.findall(r"\('([^']+)', ([-\d.]+)\)", quoted)]
    printed = "".join(out.get("text", "") for out in executed.cells[-1].outputs)
    got = eval(printed)  # a list of (name, float) the cell printed
    assert [name for name, _ in got] == [name for name, _ in expected]
    assert [round(value, 2) for _, value in got] == [value for _, value in expected]
