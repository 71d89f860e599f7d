"""IPython magics: thin layers over the Python API (parsing and display only)."""

from __future__ import annotations

from typing import Any


def register(ipython: Any) -> None:
    """Register ``%%trace``, ``%patch_sweep``, ``%edge_attribution`` and
    ``%attribution_graph`` with a shell."""
    from ipy_intervene.magics.edge_magic import EdgeMagics
    from ipy_intervene.magics.graph_magic import GraphMagics
    from ipy_intervene.magics.sweep_magic import SweepMagics
    from ipy_intervene.magics.trace_magic import TraceMagics

    ipython.register_magics(TraceMagics, SweepMagics, EdgeMagics, GraphMagics)
