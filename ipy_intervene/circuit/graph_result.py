"""What :func:`~ipy_intervene.circuit.attribution_graph.attribution_graph` returns: the
nodes, the adjacency, its exactness, scores, pruning, top paths and interventions.

>>> g = ii.attribution_graph(model, prompt, "demo")                  # doctest: +SKIP
>>> g.exactness() < 1e-4, g.replacement_score, g.completeness_score  # doctest: +SKIP
>>> p = g.prune(node_threshold=0.8, edge_threshold=0.98)             # doctest: +SKIP
>>> p.top_paths(3)                                                   # doctest: +SKIP
>>> g.intervene({"f2.14.305": 0}).top_after                          # doctest: +SKIP
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Mapping

import torch

from ipy_intervene.circuit import graph_prune
from ipy_intervene.circuit.replacement import unembedded
from ipy_intervene.errors import InputError

_ID = re.compile(r"^(?:f(\d+)\.(\d+)\.(\d+)|e(\d+)\.(\d+)|t(\d+)|logit:(\d+|diff))$")


@dataclass
class Nodes:
    """The nodes: features ``(layer, pos, latent, activation)`` sorted by layer, then one
    error per (layer, pos), one token per pos, then the outputs (labels, weights, and the
    ``(token, minus token or None)`` each one reads)."""

    features: list[tuple[int, int, int, float]]
    n_layers: int
    n_pos: int
    tokens: list[str]
    logits: list[str]
    weights: torch.Tensor
    vectors: list[tuple[int, int | None]]

    @property
    def error_start(self) -> int:
        return len(self.features)

    @property
    def token_start(self) -> int:
        return self.error_start + self.n_layers * self.n_pos

    @property
    def n_sources(self) -> int:
        return self.token_start + self.n_pos

    def __len__(self) -> int:
        return self.n_sources + len(self.logits)

    def layer_spans(self) -> dict[int, tuple[int, int]]:
        spans, start = {}, 0
        for layer in range(self.n_layers):
            stop = start
            while stop < len(self.features) and self.features[stop][0] == layer:
                stop += 1
            spans[layer], start = (start, stop), stop
        return spans

    def subset(self, keep: list[int]) -> "Nodes":
        return replace(self, features=[self.features[i] for i in keep])

    @cached_property
    def ids(self) -> list[str]:
        out = [f"f{l}.{p}.{f}" for l, p, f, _ in self.features]
        out += [f"e{l}.{p}" for l in range(self.n_layers) for p in range(self.n_pos)]
        out += [f"t{p}" for p in range(self.n_pos)]
        out += [f"logit:{'diff' if bad is not None else good}" for good, bad in self.vectors]
        return out

    @cached_property
    def _index(self) -> dict[str, int]:
        return {node_id: i for i, node_id in enumerate(self.ids)}

    def index(self, node_id: str) -> int:
        """The row/column of a node id; an unknown id is an InputError saying why."""
        if node_id in self._index:
            return self._index[node_id]
        m = _ID.match(str(node_id))
        if m is None:
            raise InputError(f"{node_id!r} is not a node id: features are f<layer>.<pos>."
                             "<latent>, errors e<layer>.<pos>, tokens t<pos>, outputs "
                             "logit:<token id> or logit:diff")
        layer = m.group(1) or m.group(4)
        if layer is not None and int(layer) >= self.n_layers:
            raise InputError(f"{node_id}: layer {layer}; the model has layers 0 to "
                             f"{self.n_layers - 1}")
        pos = m.group(2) or m.group(5) or m.group(6)
        if pos is not None and int(pos) >= self.n_pos:
            raise InputError(f"{node_id}: position {pos}; the prompt has {self.n_pos} tokens")
        raise InputError(f"{node_id} is not in this graph (an inactive latent, an output not "
                         "traced, or a feature not expanded)")

    def key(self, node_id: str) -> tuple:
        i = self.index(node_id)
        if i < self.error_start:
            layer, pos, latent, _ = self.features[i]
            return ("f", layer, pos, latent)
        if i < self.token_start:
            return ("e", *divmod(i - self.error_start, self.n_pos))
        if i < self.n_sources:
            return ("t", i - self.token_start)
        return ("logit", i - self.n_sources)

    def index_of(self, key: tuple) -> int:
        if key[0] == "f":
            return self.index(f"f{key[1]}.{key[2]}.{key[3]}")
        if key[0] == "e":
            return self.error_start + key[1] * self.n_pos + key[2]
        return self.token_start + key[1]

    def label(self, i: int) -> str:
        """A short label: ``f2.14.305 @'to'``, ``err L1 @'Mary'``, ``'Mary'``, ``→ ' Paris'``."""
        key = self.key(self.ids[i])
        if key[0] == "f":
            return f"{self.ids[i]} @{self.tokens[key[2]]!r}"
        if key[0] == "e":
            return f"err L{key[1]} @{self.tokens[key[2]]!r}"
        if key[0] == "t":
            return repr(self.tokens[key[1]])
        return f"-> {self.logits[key[1]]!r}"


@dataclass
class AttributionGraph:
    """``adjacency[t, s]``: direct effect of node ``s`` on the input of node ``t``; rows
    ``target_rows`` (expanded features, then outputs) have inputs: ``values`` (in the frozen
    model) = ``bias`` + the row's sum + ``dropped_in`` (edges from features not expanded)."""

    nodes: Nodes
    adjacency: torch.Tensor
    target_rows: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    dropped_in: torch.Tensor
    _context: dict = field(default_factory=dict, repr=False)
    _shown_in: Any = field(default=None, repr=False, compare=False)   # mark_shown

    @property
    def ids(self) -> list[str]:
        return self.nodes.ids

    @property
    def weights(self) -> torch.Tensor:
        """Output weights over all nodes (the outputs' probabilities, 0 elsewhere)."""
        w = torch.zeros(len(self.nodes))
        w[self.nodes.n_sources:] = self.nodes.weights.float()
        return w

    def exactness(self) -> float:
        """The largest ``|value - bias - sum of incoming edges|`` over the targets: how far
        the graph is from adding up (float rounding only)."""
        rows = self.target_rows
        total = self.bias + self.adjacency[rows].double().sum(1) + self.dropped_in[rows]
        return float((self.values - total).abs().max()) if len(rows) else 0.0

    @cached_property
    def _scores(self) -> tuple[float, float]:
        n = self.nodes
        return graph_prune.scores(self.adjacency, self.weights, (n.error_start, n.token_start),
                                  (n.token_start, n.n_sources))

    @property
    def replacement_score(self) -> float:
        return self._scores[0]

    @property
    def completeness_score(self) -> float:
        return self._scores[1]

    def edge(self, source: str, target: str) -> float:
        """The direct effect of ``source`` on ``target``'s input."""
        return float(self.adjacency[self.nodes.index(target), self.nodes.index(source)])

    def incoming(self, node_id: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` biggest direct effects on ``node_id`` (by size, signed)."""
        row = self.adjacency[self.nodes.index(node_id)]
        top = row.abs().topk(min(k, int((row != 0).sum())))
        return [(self.ids[i], float(row[i])) for i in top.indices.tolist()]

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98
              ) -> "PrunedGraph":
        """Keep the nodes and edges that carry these shares of the influence on the outputs."""
        n = self.nodes
        p = graph_prune.prune(self.adjacency, self.weights, len(n.features),
                              n.token_start - n.error_start, node_threshold, edge_threshold)
        return PrunedGraph(self, p.node_mask, p.edge_mask, p.node_influence)

    def top_paths(self, k: int = 5) -> list[tuple[float, list[str]]]:
        """The ``k`` strongest token-to-output paths (product of edge shares)."""
        return _paths(self, self.adjacency, k)

    def intervene(self, edits: Mapping[str, Any], errors: str = "frozen") -> "Intervention":
        """Set, scale or zero nodes (``{"f2.14.305": 0, "e1.3": ("scale", 0.5)}``) and see
        the outputs: the graph's prediction, the frozen model's, and the unfrozen model's
        logits and top tokens before and after."""
        from ipy_intervene.circuit import graph_intervene as gi

        ctx = self._context
        parsed = gi.parse_edits(self.nodes, edits)
        targets = [("logit", i) for i in range(len(self.nodes.logits))]
        out_rows = slice(len(self.target_rows) - len(targets), None)
        pred = gi.predicted(self, parsed)[out_rows]
        model = ctx["model"]
        frozen_after = gi.frozen_values(model.module, ctx["adapter"], ctx["rec"],
                                        ctx["transcoders"], self.nodes, targets, linear=True,
                                        edits=parsed)
        rec = ctx["rec"]
        with torch.no_grad():
            before_raw = unembedded(model.module, ctx["adapter"], rec.final)
        after, after_raw = gi.unfrozen_logits(self, parsed, errors)
        return Intervention(self, dict(edits), pred, frozen_after - self.values[out_rows],
                            rec.logits.float(), after.float(), before_raw, after_raw)

    def apply(self, model: Any, edits: Mapping[str, Any], errors: str = "frozen",
              align: str = "start") -> None:
        """Inside a ``%%trace`` cell (``model``: the cell's model), set, scale or zero graph
        nodes in the running forward, in one call: the cell's logits are then those of
        :meth:`intervene`'s unfrozen model. ``errors="frozen"`` (as ``intervene``) needs the
        graph's prompt; ``errors="live"`` (each MLP's own output plus the change the edits
        make) works on any prompts, a node's position taken from each prompt's start
        (``align="start"``) or end (``"end"``).

        >>> %%trace model [prompt, other]                                   # doctest: +SKIP
        ... g.apply(model, {"f2.14.305": 0.0, "e1.3": ("scale", 0)}, errors="live")
        ... logits = model.lm_head.output
        """
        from ipy_intervene.circuit import graph_intervene as gi

        gi.apply_in_trace(self, model, gi.parse_edits(self.nodes, edits), errors, align)

    def show(self, prune: bool = True, node_threshold: float = 0.8,
             edge_threshold: float = 0.98, **kwargs: Any) -> Any:
        """The graph view, pruned with these thresholds unless ``prune=False``; ``groups=``
        (supernodes by hand), ``top_tokens=`` (from :func:`top_activations`), ``max_edges=``.

        >>> g.show(groups={"say Mary": ["f3.5.12", "f3.5.40"]})          # doctest: +SKIP
        """
        from ipy_intervene.widgets.attribution_graph_view import AttributionGraphView

        pruned = self.prune(node_threshold, edge_threshold) if prune else None
        return AttributionGraphView(self, pruned=pruned, **kwargs)

    def __repr__(self) -> str:
        n = self.nodes
        return (f"AttributionGraph({n.n_pos} tokens, {len(n.features)} features, "
                f"{n.n_layers * n.n_pos} errors, {len(n.logits)} outputs; replacement "
                f"{self.replacement_score:.3f}, completeness {self.completeness_score:.3f}, "
                f"edges add up to {self.exactness():.2g})")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        return self.show()._repr_mimebundle_(include, exclude)

    def mark_shown(self) -> None:
        """Say the running cell has shown this graph (``%attribution_graph`` shows its view
        itself), so that IPython's ``Out[]`` of the same cell does not show it again."""
        cell = _running_cell()
        self._shown_in = None if cell is None else weakref.ref(cell)

    def _ipython_display_(self) -> None:
        if self._shown_in is not None and self._shown_in() is _running_cell():
            self._shown_in = None
            return
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)


def _running_cell() -> Any:
    """The ExecutionResult of the cell IPython is running; None outside a cell."""
    from IPython import get_ipython

    return getattr(getattr(get_ipython(), "displayhook", None), "exec_result", None)


@dataclass
class PrunedGraph:
    """A pruned view of an attribution graph: ``node_mask``, ``edge_mask [target, source]``
    and each node's influence on the outputs."""

    graph: AttributionGraph
    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    node_influence: torch.Tensor

    @property
    def adjacency(self) -> torch.Tensor:
        return self.graph.adjacency * self.edge_mask

    @property
    def kept(self) -> list[str]:
        return [self.graph.ids[i] for i in self.node_mask.nonzero().flatten().tolist()]

    def edges(self) -> list[tuple[str, str, float]]:
        """``(source, target, weight)`` of the kept edges, biggest first."""
        t, s = self.edge_mask.nonzero(as_tuple=True)
        w = self.graph.adjacency[t, s]
        order = w.abs().argsort(descending=True).tolist()
        ids = self.graph.ids
        return [(ids[int(s[i])], ids[int(t[i])], float(w[i])) for i in order]

    def top_paths(self, k: int = 5) -> list[tuple[float, list[str]]]:
        return _paths(self.graph, self.adjacency, k)

    def show(self, **kwargs: Any) -> Any:
        from ipy_intervene.widgets.attribution_graph_view import AttributionGraphView

        return AttributionGraphView(self.graph, pruned=self, **kwargs)

    def __repr__(self) -> str:
        n = self.graph.nodes
        feats = int(self.node_mask[:len(n.features)].sum())
        return (f"PrunedGraph({feats} of {len(n.features)} features, "
                f"{int(self.edge_mask.sum())} edges)")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        return self.show()._repr_mimebundle_(include, exclude)


def _paths(graph: AttributionGraph, adjacency: torch.Tensor, k: int
           ) -> list[tuple[float, list[str]]]:
    n = graph.nodes
    sources = list(range(n.token_start, n.n_sources))
    found = graph_prune.top_paths(adjacency, graph.weights, sources, k)
    return [(score, [graph.ids[i] for i in path]) for score, path in found]


@dataclass
class Intervention:
    """An edit of graph nodes and its effect on the outputs: ``predicted`` (the graph's
    propagation) and ``frozen`` (the frozen model's) changes of each output node, which
    agree; the unfrozen model's last-position logits ``before``/``after``."""

    graph: AttributionGraph
    edits: dict
    predicted: torch.Tensor
    frozen: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor
    before_raw: torch.Tensor | None = None   # the logits the output nodes read (pre-cap)
    after_raw: torch.Tensor | None = None

    @property
    def unfrozen(self) -> torch.Tensor:
        """Each output node's change in the unfrozen model (in the output nodes' units:
        before any soft-cap, like ``predicted``)."""
        from ipy_intervene.circuit.graph_intervene import _logit

        n = self.graph.nodes
        before = self.before if self.before_raw is None else self.before_raw
        after = self.after if self.after_raw is None else self.after_raw
        return torch.stack([_logit(after, n, i) - _logit(before, n, i)
                            for i in range(len(n.logits))]).double()

    def top(self, logits: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
        tok = self.graph._context["model"].tokenizer
        probs = torch.softmax(logits, -1).topk(k)
        return [(tok.decode([i]) if tok is not None else str(i), round(float(p), 4))
                for p, i in zip(probs.values, probs.indices.tolist())]

    @property
    def top_before(self) -> list[tuple[str, float]]:
        return self.top(self.before)

    @property
    def top_after(self) -> list[tuple[str, float]]:
        return self.top(self.after)

    def __repr__(self) -> str:
        lines = [f"Intervention({', '.join(f'{k}: {v}' for k, v in self.edits.items())})"]
        for i, label in enumerate(self.graph.nodes.logits):
            lines.append(f"  {label!r}: predicted {float(self.predicted[i]):+.4f}, frozen "
                         f"{float(self.frozen[i]):+.4f}, unfrozen "
                         f"{float(self.unfrozen[i]):+.4f}")
        lines.append(f"  top before: {self.top_before}")
        lines.append(f"  top after:  {self.top_after}")
        return "\n".join(lines)
