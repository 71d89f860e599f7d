"""IPython magics: thin layers over the Python API (parsing and display only)."""

from __future__ import annotations

from typing import Any


def register(ipython: Any) -> None:
    """Register ``%%trace``, ``%patch_sweep`` and ``%edge_attribution`` with a shell."""
    from ipy_intervene.magics.edge_magic import EdgeMagics
    from ipy_intervene.magics.sweep_magic import SweepMagics
    from ipy_intervene.magics.trace_magic import TraceMagics

    ipython.register_magics(TraceMagics, SweepMagics, EdgeMagics)
