"""The circuit view: its edges drawn with Graphviz (pygraphviz), as offline SVG.

Nodes are ranked by layer from the embeddings at the bottom to the logits at the top (a
layer's heads on one rank, its MLP on the next); an edge's width grows with ``|score|``, its
colour says the sign (blue: raises the metric, red: lowers it), its label names the input it
enters (q, k, v) and its score, and every node and edge has a tooltip with the numbers.

>>> view = CircuitView(result.circuit(top=20))                 # doctest: +SKIP
>>> view.svg()[:4]                                              # doctest: +SKIP
'<svg'
"""

from __future__ import annotations

import html
import math
from typing import Any

from ipy_intervene.widgets.graph_view import render_svg

POSITIVE, NEGATIVE, UNSCORED = "#1f5fbf", "#c0392b", "#777777"


class CircuitView:
    """Displays a :class:`~ipy_intervene.circuit.result.Circuit`; deterministic output."""

    def __init__(self, circuit: Any) -> None:
        self.circuit = circuit

    def dot(self) -> str:
        """The DOT source of the drawing."""
        edges = self.circuit.edges
        nodes = self.circuit.nodes
        biggest = max((abs(v) for _, _, v in edges if not math.isnan(v)), default=0.0)
        lines = ["digraph circuit {", '  rankdir=BT; newrank=true; nodesep=0.25; ranksep=0.45;',
                 '  node [fontname="Helvetica", fontsize=10, style="filled,rounded", '
                 'shape=box, penwidth=0.8];',
                 '  edge [fontname="Helvetica", fontsize=8, arrowsize=0.5];']
        lines += self._nodes(nodes, edges)
        lines += [self._edge(s, r, v, biggest) for s, r, v in edges]
        lines.append("}")
        return "\n".join(lines)

    def _nodes(self, nodes: list[str], edges: list) -> list[str]:
        weight = {n: 0.0 for n in nodes}
        for s, r, v in edges:
            for n in (s, r.split(".")[0]):
                weight[n] = weight.get(n, 0.0) + (0.0 if math.isnan(v) else abs(v))
        ranks: dict[int, list[str]] = {}
        out = []
        for name in nodes:
            rank = _rank(name)
            ranks.setdefault(rank, []).append(name)
            fill = {"embed": "#e6f4ea", "logits": "#fff3cd"}.get(name, "#e8f0fe" if
                                                                  name.startswith("L") else
                                                                  "#fde2e1")
            tip = f"{name}: sum of |score| over its edges here {weight[name]:.4g}"
            out.append(f'  "{name}" [fillcolor="{fill}", tooltip="{_esc(tip)}"];')
        for rank in sorted(ranks):
            members = " ".join(f'"{n}";' for n in ranks[rank])
            out.append(f"  {{ rank=same; {members} }}")
        return out

    def _edge(self, sender: str, receiver: str, score: float, biggest: float) -> str:
        target, _, into = receiver.partition(".")
        if math.isnan(score):
            colour, width, text = UNSCORED, 1.0, into
        else:
            colour = POSITIVE if score >= 0 else NEGATIVE
            width = 0.6 + 4.4 * (abs(score) / biggest if biggest > 0 else 0.0)
            text = f"{into} {score:+.3g}".strip()
        tip = f"{sender} -> {receiver}: " + ("no score" if math.isnan(score) else f"{score:+.6g}")
        return (f'  "{sender}" -> "{target}" [color="{colour}", penwidth={width:.2f}, '
                f'label="{_esc(text)}", fontcolor="{colour}", tooltip="{_esc(tip)}", '
                f'labeltooltip="{_esc(tip)}"];')

    def svg(self) -> str | None:
        return render_svg(self.dot())

    def text(self) -> str:
        rows = [f"  {s:>6} -> {r:<10} {v:+.5f}" for s, r, v in self.circuit.edges[:20]]
        more = len(self.circuit) - len(rows)
        return "\n".join([repr(self.circuit), *rows] + ([f"  ... {more} more"] if more > 0 else []))

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        bundle = {"text/plain": self.text()}
        svg = self.svg()
        caption = html.escape(repr(self.circuit))
        if svg is not None:
            bundle["image/svg+xml"] = svg
            bundle["text/html"] = (f'<div class="ii-circuit"><div>{caption}</div>{svg}</div>')
        else:
            bundle["text/html"] = f"<div>{caption}</div><pre>{html.escape(self.dot())}</pre>"
        return bundle

    def __repr__(self) -> str:
        return f"<CircuitView {self.circuit!r}>"


def _rank(name: str) -> int:
    """embed 0; layer l's heads (and kv heads, or its ``ATTN{l}``) 2l + 1, its MLP 2l + 2;
    logits last."""
    if name == "embed":
        return 0
    if name == "logits":
        return 10 ** 6
    if name.startswith("MLP"):
        return 2 * int(name[3:]) + 2
    if name.startswith("ATTN"):
        return 2 * int(name[4:]) + 1
    return 2 * int(name[1:].split("H")[0].split("K")[0]) + 1


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
