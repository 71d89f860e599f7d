"""The demo report runs its notebooks in kernels over local IPC sockets: no TCP port, and no
kernel warning about plain-text TCP in the tool's output."""

from __future__ import annotations

import nbformat

from ipy_intervene.report import execute


def test_a_notebook_runs_over_ipc_without_the_tcp_warning(tmp_path, capfd):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import os\nprint(6 * 7)"))
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, str(path))
    done = execute(path, timeout=120)
    assert done.cells[0].outputs[0]["text"].strip() == "42"
    err = capfd.readouterr().err
    assert "without encryption" not in err and "TCP" not in err
    assert not any(p.name.startswith("kernel") for p in tmp_path.iterdir())  # sockets elsewhere
