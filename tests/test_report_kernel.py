"""The demo report runs its notebooks in kernels over local IPC sockets: no TCP port, and no
kernel warning about plain-text TCP in the tool's output."""

from __future__ import annotations

import os
import time
from pathlib import Path

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
    for _ in range(50):                                   # the kernel is shut down, not left
        if not kernels_of(os.getpid()):                   # running until this process exits
            break
        time.sleep(0.1)
    assert kernels_of(os.getpid()) == []


def kernels_of(parent: int) -> list[int]:
    """Live ipykernel processes started by ``parent``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if fields[1] == str(parent) and fields[0] != "Z" and b"ipykernel" in cmd:
            found.append(int(proc.name))
    return found
