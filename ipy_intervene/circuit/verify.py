"""Running a circuit exactly: one forward in which every edge outside the circuit carries the
ablated write of its sender.

On the clean prompts, each receiver v (each head's q, k and v input separately, each MLP
input, the logits) reads::

    input_v = sum over senders u upstream of v of   write_u        if u -> v is in the circuit
                                                    ablated_u      otherwise
              (+ the out-projection biases, the same in every run)

``write_u`` is u's write in this same run (so a node whose own inputs were ablated passes
the change on), ``ablated_u`` is u's write in the corrupted run (``ablation="corrupted"``) or
its mean over the corrupted prompts at each position (``ablation="mean"``). All edges in the
circuit is the clean run; no edge in it is the corrupted run (with ``"corrupted"``).

>>> m = ii.logit_diff("Mary", "John")                             # doctest: +SKIP
>>> v = ii.verify_circuit(model, circuit, clean, corrupt, m)       # doctest: +SKIP
>>> v.recovered                                                     # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ipy_intervene.analysis.inputs import prepare_pair
from ipy_intervene.analysis.metrics import as_metric
from ipy_intervene.analysis.reads import OnLogits
from ipy_intervene.circuit.graph import Graph, build_graph, edge_mask
from ipy_intervene.circuit.runs import GraphRun, Writes
from ipy_intervene.errors import InputError, InterventionError
from ipy_intervene.infra.hooks import HookSession, entry_point
from ipy_intervene.model.loading import warn_if_training, wrap

ABLATIONS = ("corrupted", "mean")


@dataclass
class VerifyResult:
    """A circuit run exactly: ``recovered = (circuit - corrupted) / (clean - corrupted)``,
    each the metric's mean over prompts (``per_prompt``: the circuit run's values)."""

    recovered: float
    circuit_metric: float
    clean_metric: float
    corrupted_metric: float
    per_prompt: torch.Tensor
    n_edges: int
    total_edges: int
    ablation: str

    def __repr__(self) -> str:
        share = "undefined (clean == corrupted)" if math.isnan(self.recovered) else \
            f"{self.recovered:.4f}"
        return (f"VerifyResult(recovered {share}: circuit {self.circuit_metric:+.4f}, clean "
                f"{self.clean_metric:+.4f}, corrupted {self.corrupted_metric:+.4f}; "
                f"{self.n_edges} of {self.total_edges} edges, ablation={self.ablation!r})")


@entry_point
def verify_circuit(model: Any, circuit: Any, clean: Any, corrupted: Any, metric: Any, *,
                   ablation: str = "corrupted", adapter: Any = None) -> VerifyResult:
    """The fraction of the clean - corrupted metric gap the circuit recovers, run exactly
    (three forwards: clean, corrupted, the circuit). ``adapter``: the ``ii.Adapter`` to
    compare the model's graph with the circuit's (default: the map the circuit was built
    with).

    >>> c = ii.edge_attribution(model, clean, corrupt, m).circuit(top=30)   # doctest: +SKIP
    >>> ii.verify_circuit(model, c, clean, corrupt, m, ablation="mean")    # doctest: +SKIP
    """
    if ablation not in ABLATIONS:
        raise InputError(f"ablation must be one of {', '.join(map(repr, ABLATIONS))}; got "
                         f"{ablation!r}")
    if not (isinstance(getattr(circuit, "graph", None), Graph)
            and isinstance(getattr(circuit, "mask", None), torch.Tensor)):
        raise InputError(f"circuit must be an ii.Circuit (from EdgeResult.circuit(...)); got "
                         f"{type(circuit).__name__}")
    model = wrap(model)
    warn_if_training(model)
    check_same_graph(circuit.graph, _model_graph(model, circuit.graph, adapter))
    a, b = prepare_pair(model, clean, corrupted)
    bound = OnLogits(model, as_metric(metric), a.size, a.length)
    graph, root = circuit.graph, model.module
    _, clean_values = record(graph, root, {**a.kwargs, **bound.keep}, bound, check=True)
    corrupt_writes, corrupt_values = record(graph, root, {**b.kwargs, **bound.keep}, bound)
    source = corrupt_writes if ablation == "corrupted" else mean_writes(corrupt_writes)
    _, values = record(graph, root, {**a.kwargs, **bound.keep}, bound, source=source,
                       patched=graph.upstream & ~circuit.mask)
    hi, lo, got = float(clean_values.mean()), float(corrupt_values.mean()), float(values.mean())
    gap = hi - lo
    return VerifyResult((got - lo) / gap if gap != 0 else float("nan"), got, hi, lo,
                        values.float().cpu(), int(circuit.mask.sum()), graph.n_edges, ablation)


@entry_point
def patch_edges(model: Any, base: Any, source: Any, metric: Any,
                edges: list[tuple[str, str]], *, adapter: Any = None) -> torch.Tensor:
    """The metric of each ``base`` prompt, run with the listed edges carrying their sender's
    write from the ``source`` prompts (every other edge: this run's own writes);
    ``adapter``: an ``ii.Adapter`` by hand (default: the family's map).

    >>> patch_edges(model, corrupt, clean, m, [("L0H1", "L2H0.q")])   # doctest: +SKIP
    """
    model = wrap(model)
    graph = build_graph(model, adapter)
    mask = edge_mask(graph, edges)
    a, b = prepare_pair(model, base, source)
    bound = OnLogits(model, as_metric(metric), a.size, a.length)
    writes, _ = record(graph, model.module, {**b.kwargs, **bound.keep}, bound)
    _, values = record(graph, model.module, {**a.kwargs, **bound.keep}, bound, source=writes,
                       patched=mask)
    return values


def mean_writes(writes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each write's mean over the prompts, at each position, for every prompt."""
    return [w.mean(0, keepdim=True).expand_as(w) for w in writes]


def _model_graph(model: Any, mine: Graph, adapter: Any) -> Graph:
    """The model's graph under ``adapter``, else under the circuit's own map; a map that
    does not fit this model means the circuit was built for another one."""
    if adapter is not None:
        return build_graph(model, adapter)
    try:
        return build_graph(model, replace(mine.adapter, n_layers=0))   # this model's layers
    except (InterventionError, AttributeError) as error:    # AttributeError: a missing path
        raise InputError(f"the circuit was built for another model ({mine.model_type}, "
                         f"{mine.n_layers} layers, {mine.n_heads} heads): its map does not "
                         f"fit this one ({getattr(error, 'detail', error)})") from None


def check_same_graph(mine: Graph, model_graph: Graph) -> None:
    """A circuit runs only on a model with the same components."""
    if [n.name for n in mine.senders] != [n.name for n in model_graph.senders] or \
            [n.name for n in mine.receivers] != [n.name for n in model_graph.receivers] or \
            mine.parallel != model_graph.parallel:
        raise InputError(f"the circuit was built for another model ({mine.model_type}, "
                         f"{mine.n_layers} layers, {mine.n_heads} heads); this one is "
                         f"{model_graph.model_type} with {model_graph.n_layers} layers and "
                         f"{model_graph.n_heads} heads")


@torch.no_grad()
def record(graph: Graph, root: nn.Module, kwargs: dict, bound: OnLogits, *,
           source: Writes | None = None, patched: torch.Tensor | None = None,
           check: bool = False) -> tuple[Writes, torch.Tensor]:
    """One forward (edges in ``patched`` carry ``source`` writes): every sender's write and
    the metric of each prompt. ``bound``: an :class:`OnLogits`, settled here on the first
    run's logits (which then cover every position)."""
    run = GraphRun(graph, root, source=source, patched=patched, check=check)
    with HookSession() as session:
        run.install(session)
        logits = root(**kwargs).logits
        if bound.reads is None:
            bound.settle(logits)
        values = bound(logits)
    return run.writes(), values.detach()
