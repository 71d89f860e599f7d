"""ipy_intervene: read and change the activations of language models from a notebook.

>>> %load_ext ipy_intervene                                  # doctest: +SKIP
>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
"""

from __future__ import annotations

from typing import Any

from ipy_intervene.analysis.cache import ActivationCache, cache
from ipy_intervene.analysis.decompose import DecomposeResult, decompose
from ipy_intervene.analysis.lens import LensResult, lens
from ipy_intervene.analysis.metrics import logit_diff, logprob, metric, prob
from ipy_intervene.analysis.patterns import PatternBatch, PatternResult, attention_patterns
from ipy_intervene.arch.sites import Adapter, adapter_for
from ipy_intervene.circuit import (
    Circuit,
    EdgeResult,
    VerifyResult,
    edge_attribution,
    verify_circuit,
)
from ipy_intervene.circuit.attribution_graph import attribution_graph
from ipy_intervene.circuit.graph_result import AttributionGraph
from ipy_intervene.edits import Edit, clear_edits, edit, edits
from ipy_intervene.errors import InterventionError
from ipy_intervene.features import (
    SAE,
    Custom,
    Direction,
    Neurons,
    Splice,
    Subspace,
    attach,
    attached,
    detach,
    feature_activations,
    load_sae,
)
from ipy_intervene.features.clt import CrossLayerTranscoder, load_clt
from ipy_intervene.features.transcoders import load_transcoders
from ipy_intervene.model.envoys import Envoy, Model
from ipy_intervene.model.loading import load_model, wrap
from ipy_intervene.model.positions import Positions, positions
from ipy_intervene.sweep import SweepResult, patch_sweep
from ipy_intervene.sweep.cluster import RayCluster
from ipy_intervene.sweep.experts import (ExpertSweepResult, RoutingResult, ablate_experts,
                                         expert_sweep, routing)
from ipy_intervene.sweep.paths import path_patch
from ipy_intervene.sweep.screen import ScreenResult, screen_and_verify
from ipy_intervene.tracing.trace import TraceResult, trace
from ipy_intervene.tracing.traced import traced

__version__ = "0.1.0"
__all__ = ["Adapter", "Envoy", "InterventionError", "LensResult", "Model", "SweepResult",
           "TraceResult", "adapter_for", "lens", "load_model", "logit_diff", "logprob",
           "metric", "patch_sweep", "prob", "trace", "wrap", "__version__"]
__all__ += ["Circuit", "EdgeResult", "VerifyResult", "edge_attribution", "verify_circuit"]
__all__ += ["ActivationCache", "PatternBatch", "Positions", "cache", "positions"]
__all__ += ["DecomposeResult", "PatternResult", "RayCluster", "ScreenResult",
            "attention_patterns", "decompose", "debug", "path_patch", "screen_and_verify"]
__all__ += ["AttributionGraph", "attribution_graph", "load_transcoders", "CrossLayerTranscoder",
            "load_clt"]
__all__ += ["Custom", "Direction", "Neurons", "SAE", "Splice", "Subspace", "attach", "attached",
            "detach", "feature_activations", "load_sae", "traced"]
__all__ += ["Edit", "clear_edits", "edit", "edits"]
__all__ += ["ExpertSweepResult", "RoutingResult", "ablate_experts", "expert_sweep", "routing"]


def debug(on: bool = True) -> None:
    """Full tracebacks (internal frames included) for errors raised by the magics.

    >>> ii.debug(True)          # doctest: +SKIP
    """
    from ipy_intervene.magics.tracebacks import debug as set_debug

    set_debug(on)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext ipy_intervene``: registers ``%%trace`` (and the other magics)."""
    from ipy_intervene.magics import register

    register(ipython)
    _warm_views()


def _warm_views() -> None:
    """Import plotly's widget machinery in the background (about 2 s, nearly all of a first
    view's build time) while the user loads a model and runs a sweep."""
    import threading

    def warm() -> None:
        try:
            from plotly.graph_objects import FigureWidget  # noqa: F401
        except Exception:  # noqa: BLE001 - the first view imports it again and says why
            pass

    threading.Thread(target=warm, name="ipy_intervene-warm-views", daemon=True).start()
