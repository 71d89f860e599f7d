"""What edge attribution returns (:class:`EdgeResult`), the circuits cut from it
(:class:`Circuit`); what running a circuit exactly gives is a
:class:`~ipy_intervene.circuit.verify.VerifyResult`.

>>> r = ii.edge_attribution(model, clean, corrupt, ii.logit_diff("Mary", "John"))  # doctest: +SKIP
>>> c = r.circuit(top=30)                                                      # doctest: +SKIP
>>> c.verify().recovered                                                       # doctest: +SKIP
0.87...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import torch

from ipy_intervene.circuit.graph import Graph, edge_mask
from ipy_intervene.errors import InputError

if TYPE_CHECKING:
    from ipy_intervene.circuit.verify import VerifyResult

Edge = tuple[str, str, float]


def _ranked(graph: Graph, scores: torch.Tensor, mask: torch.Tensor) -> list[Edge]:
    """The edges in ``mask``, largest ``|score|`` first (ties: graph order)."""
    idx = mask.nonzero().tolist()
    edges = [(graph.senders[s].name, graph.receivers[r].name, float(scores[s, r]))
             for s, r in idx]
    return sorted(edges, key=lambda e: -abs(e[2]) if not math.isnan(e[2]) else 0.0)


@dataclass
class EdgeResult:
    """Every edge's score: ``scores[sender, receiver]`` (NaN where no edge exists),
    ``per_prompt[prompt, sender, receiver]``; names in ``graph.senders`` / ``graph.receivers``.
    ``clean_metric`` / ``corrupted_metric``: the metric's mean over prompts in each run."""

    graph: Graph
    scores: torch.Tensor
    per_prompt: torch.Tensor
    method: str
    steps: int
    clean_metric: float
    corrupted_metric: float
    metric: str
    seconds: float
    inputs: tuple | None = field(default=None, repr=False)   # (model, clean, corrupted, metric)
    direction: str = "denoising"  # which run is patched into which (see ii.edge_attribution)

    def edges(self, k: int | None = None) -> list[Edge]:
        """``(sender, receiver, score)``, largest ``|score|`` first; ``k`` of them (all).

        >>> r.edges(2)                                     # doctest: +SKIP
        [('L1H3', 'logits', 2.41...), ('embed', 'L1H3.v', 0.97...)]
        """
        ranked = _ranked(self.graph, self.scores, self.graph.upstream)
        return ranked if k is None else ranked[:_count(k, "k", len(ranked))]

    def score(self, sender: str, receiver: str) -> float:
        """The score of one edge: ``r.score("L1H3", "logits")``."""
        s, v = self.graph.sender_index(sender), self.graph.receiver_index(receiver)
        if not bool(self.graph.upstream[s, v]):
            raise InputError(f"{sender} -> {receiver} is not an edge: {sender} is not upstream "
                             f"of {receiver}")
        return float(self.scores[s, v])

    def circuit(self, top: int | None = None, *, threshold: float | None = None) -> "Circuit":
        """The ``top`` edges by ``|score|``, or those with ``|score| >= threshold``.

        >>> r.circuit(top=20).nodes                          # doctest: +SKIP
        """
        if (top is None) == (threshold is None):
            raise InputError("circuit() takes exactly one of top= (how many edges) or "
                             f"threshold= (the smallest |score| kept); got top={top!r}, "
                             f"threshold={threshold!r}")
        if top is not None:
            chosen = self.edges(_count(top, "top", self.graph.n_edges))
        else:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                    or not threshold >= 0:
                raise InputError(f"threshold must be a number >= 0 (the smallest |score| "
                                 f"kept); got {threshold!r}")
            chosen = [e for e in self.edges() if abs(e[2]) >= threshold]
        return Circuit.from_edges(self.graph, [(s, r) for s, r, _ in chosen], scores=self)

    def text(self, k: int = 10) -> str:
        """A few lines: the run, then the ``k`` largest edges."""
        top = self.edges(min(k, self.graph.n_edges))
        rows = [f"  {s:>6} -> {r:<10} {v:+.5f}" for s, r, v in top]
        return "\n".join([repr(self), f"top {len(rows)} edges:", *rows])

    def __repr__(self) -> str:
        return (f"EdgeResult({self.method}{'' if self.method == 'eap' else f', steps={self.steps}'}"
                f"{'' if self.direction == 'denoising' else f', {self.direction}'}"
                f", {self.metric}: clean {self.clean_metric:+.4f}, corrupted "
                f"{self.corrupted_metric:+.4f}; {self.graph.n_edges} edges, "
                f"{self.seconds:.2f} s)")

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def show(self, top: int = 30) -> Any:
        """The view of the ``top`` edges (SVG, offline)."""
        return self.circuit(top=min(top, self.graph.n_edges)).show()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = self.show()._repr_mimebundle_(include, exclude)
        bundle["text/plain"] = self.text()
        return bundle


def _count(value: Any, name: str, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a whole number >= 1; got {value!r}")
    if value > most:
        raise InputError(f"{name}={value} is more than the {most} edges of the graph")
    return value


@dataclass
class Circuit:
    """A set of edges of ``graph`` (``mask[sender, receiver]``). ``scores``: the
    :class:`EdgeResult` it came from (its numbers label the view, its inputs are the
    defaults of :meth:`verify`)."""

    graph: Graph
    mask: torch.Tensor
    scores: EdgeResult | None = field(default=None, repr=False)

    @classmethod
    def from_edges(cls, graph: Graph, edges: Iterable[tuple[str, str]],
                   scores: EdgeResult | None = None) -> "Circuit":
        """``Circuit.from_edges(graph, [("embed", "L0H1.q"), ("L0H1", "logits")])``."""
        mask = edge_mask(graph, edges)
        return cls(graph, mask, scores)

    @classmethod
    def full(cls, graph: Graph) -> "Circuit":
        """Every edge: runs as the clean model."""
        return cls(graph, graph.upstream.clone())

    @classmethod
    def empty(cls, graph: Graph) -> "Circuit":
        """No edge: every receiver reads the ablated writes."""
        return cls(graph, torch.zeros_like(graph.upstream))

    @property
    def edges(self) -> list[Edge]:
        """``(sender, receiver, score)`` (score NaN without an :class:`EdgeResult`)."""
        values = self.scores.scores if self.scores is not None else torch.full(
            self.mask.shape, float("nan"), dtype=torch.float32)
        return _ranked(self.graph, values, self.mask)

    @property
    def nodes(self) -> list[str]:
        """The components with an edge in the circuit, in graph order."""
        used = {self.graph.senders[s].name for s in self.mask.any(1).nonzero().flatten().tolist()}
        used |= {self.graph.receivers[r].component
                 for r in self.mask.any(0).nonzero().flatten().tolist()}
        order = [n.name for n in self.graph.senders] + [n.component for n in self.graph.receivers]
        return sorted(used, key=order.index)

    def __len__(self) -> int:
        return int(self.mask.sum())

    def verify(self, model: Any = None, clean: Any = None, corrupted: Any = None,
               metric: Any = None, *, ablation: str = "corrupted") -> "VerifyResult":
        """Run the circuit exactly (see :func:`ipy_intervene.circuit.verify.verify_circuit`);
        the defaults are the inputs of the edge attribution the circuit came from.

        >>> r.circuit(top=30).verify(ablation="mean").recovered    # doctest: +SKIP
        """
        from ipy_intervene.circuit.verify import verify_circuit

        given = (model, clean, corrupted, metric)
        if any(x is None for x in given):
            if self.scores is None or self.scores.inputs is None:
                raise InputError("verify() needs model, clean, corrupted and metric for a "
                                 "circuit that does not come from ii.edge_attribution")
            given = tuple(g if g is not None else d for g, d in zip(given, self.scores.inputs))
        return verify_circuit(given[0], self, given[1], given[2], given[3], ablation=ablation)

    def show(self) -> Any:
        """The circuit drawn: nodes by layer, edges by score (SVG, offline)."""
        from ipy_intervene.circuit.view import CircuitView

        return CircuitView(self)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return self.show()._repr_mimebundle_(include, exclude)

    def __repr__(self) -> str:
        return f"Circuit({len(self)} of {self.graph.n_edges} edges, {len(self.nodes)} nodes)"
