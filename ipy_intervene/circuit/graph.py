"""The graph of components that edge attribution scores and circuits keep or drop.

Senders write into the residual stream: ``embed`` (the residual entering block 0: token
embeddings plus, in GPT-2, position embeddings), each head ``L{l}H{h}`` (its ``result``: its
``z`` through its slice of the out-projection, bias not included) and each ``MLP{l}`` (what
the block adds for it: the MLP's output, or its post-norm's output where it has one).

Under a norm after attention (Gemma 2/3, OLMo 2/3: ``post_attention_layernorm``) what
attention adds is ``norm(o_proj(z of all heads))``, not a sum of one write per head, so the
sender is the whole layer: ``ATTN{l}``, that norm's output (out-projection bias included).
Receivers stay per head there (a head's q/k/v input is the stream before the pre-norm,
linear in every write). Receivers read a residual stream: each head's query input ``L{l}H{h}.q``, its key and
value inputs ``L{l}H{h}.k`` / ``.v`` (under GQA one per kv head: ``L{l}KV{g}.k`` / ``.v``,
read by query heads ``g * group .. (g + 1) * group - 1``), each ``MLP{l}`` input and the
``logits`` (the final norm's input). A receiver's input is the sum of the writes of the
senders upstream of it (plus the out-projection biases, which no run changes), so an edge
``u -> v`` is u's write as v reads it.

Upstream: ``embed`` feeds everything; a component of layer l feeds the heads of later layers
and the logits; a head of layer l feeds ``MLP{l}`` in sequential models (GPT-2, Llama) but
not with a parallel residual (the adapter's ``mid_norm`` is None: GPT-J, GPT-NeoX/Pythia and
StableLM with ``use_parallel_residual``: attention and MLP of a layer read the same stream).

Every fact about the model family comes from the architecture layer: the site map
(:func:`~ipy_intervene.arch.sites.adapter_for`, the family's or an ``ii.Adapter`` by hand)
and the per-head columns of the q/k/v projections
(:func:`~ipy_intervene.arch.qkv.attention_layout`).

>>> import ipy_intervene as ii
>>> g = build_graph(ii.load_model("demo"))
>>> len(g.senders), len(g.receivers), g.receivers[0].name
(21, 53, 'L0H0.q')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ipy_intervene.arch.qkv import AttentionLayout, attention_layout, check_values
from ipy_intervene.arch.sites import Adapter, adapter_for, get_path
from ipy_intervene.errors import InputError


@dataclass(frozen=True)
class Node:
    """A sender or a receiver. ``layer`` is -1 for ``embed`` and ``n_layers`` for ``logits``;
    ``index`` is the head (or kv head) for attention, else -1; ``role`` is ``embed``,
    ``head``, ``attn`` (a layer's whole attention write, under a post-norm), ``mlp`` (senders) or ``q``, ``k``, ``v``, ``mlp``, ``logits`` (receivers)."""

    name: str
    layer: int
    index: int
    role: str

    @property
    def component(self) -> str:
        """The component a receiver belongs to: ``"L1H2.q"`` -> ``"L1H2"``."""
        return self.name.split(".")[0]


@dataclass(frozen=True)
class Slot:
    """Output columns ``start:stop`` of a q/k/v projection, computed from the input of
    attention receiver ``receiver`` (its index among its layer's attention receivers)."""

    projection: str        # path inside a block: "attn.c_attn", "self_attn.q_proj", ...
    receiver: int
    start: int
    stop: int


@dataclass
class Graph:
    """Senders, receivers and which sender is upstream of which receiver, for one model."""

    model_type: str        # the adapter's name (the model_type for the table's families)
    adapter: Adapter
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    parallel: bool
    senders: list[Node]
    receivers: list[Node]
    upstream: torch.Tensor              # [senders, receivers] bool: the edges
    slots: list[Slot] = field(default_factory=list)   # one layer's q/k/v columns
    layout: AttentionLayout | None = None

    @property
    def head_senders(self) -> bool:
        """Attention sends one write per head (False under a post-norm: one ``ATTN{l}``)."""
        return self.layout is None or self.layout.head_senders

    @property
    def attn_senders(self) -> int:
        """Attention senders per layer: ``n_heads``, or 1 (``ATTN{l}``) under a post-norm."""
        return self.n_heads if self.head_senders else 1

    @property
    def per_layer(self) -> int:
        """Attention receivers per layer: ``n_heads`` queries, ``n_kv`` keys, ``n_kv`` values."""
        return self.n_heads + 2 * self.n_kv

    @property
    def n_edges(self) -> int:
        return int(self.upstream.sum())

    def head_sender(self, layer: int, head: int) -> int:
        """Sender index of head ``head`` of ``layer`` (of ``ATTN{layer}`` under a post-norm,
        whatever ``head``)."""
        return 1 + layer * (self.attn_senders + 1) + (head if self.head_senders else 0)

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.attn_senders + 1) + self.attn_senders

    def attn_receivers(self, layer: int) -> range:
        start = layer * (self.per_layer + 1)
        return range(start, start + self.per_layer)

    def mlp_receiver(self, layer: int) -> int:
        return layer * (self.per_layer + 1) + self.per_layer

    @property
    def logits_receiver(self) -> int:
        return len(self.receivers) - 1

    def sender_index(self, name: str) -> int:
        return _index([n.name for n in self.senders], name, "sender")

    def receiver_index(self, name: str) -> int:
        return _index([n.name for n in self.receivers], name, "receiver")

    @property
    def shared_norm(self) -> bool:
        """Attention and the MLP read the block's input through one norm (GPT-J)."""
        return self.layout is not None and self.layout.shared_norm

    def block(self, root: nn.Module, layer: int) -> nn.Module:
        return get_path(root, self.adapter.blocks)[layer]

    def part(self, root: nn.Module, layer: int, name: str) -> nn.Module:
        """A module of block ``layer``: ``attn_norm``, ``mlp_norm``, ``out_proj``, ``attn``,
        ``mlp``, ``attn_writer`` or ``mlp_writer`` (what the block adds: a post-norm or the
        sublayer) (``part(root, 2, "attn_norm")``), as the adapter and its layout name it."""
        assert self.layout is not None
        path = {"attn_norm": self.layout.attn_norm, "mlp_norm": self.layout.mlp_norm,
                "out_proj": self.layout.out_proj, "attn": self.adapter.attn,
                "mlp": self.adapter.mlp, "attn_writer": self.layout.attn_writer,
                "mlp_writer": self.layout.mlp_writer}[name]
        return get_path(self.block(root, layer), path)

    def final_norm(self, root: nn.Module) -> nn.Module:
        return get_path(root, self.adapter.final_norm)


def _index(names: list[str], name: str, what: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        close = [n for n in names if n.split(".")[0] == name.split(".")[0]][:6]
        raise InputError(f"unknown {what} {name!r}; {what}s look like {names[1]!r}"
                         + (f" (near it: {', '.join(close)})" if close else "")) from None


def edge_mask(graph: Graph, edges: Any) -> torch.Tensor:
    """``[senders, receivers]`` bool with the listed ``(sender, receiver)`` names set; an
    error for a pair that is not an edge."""
    mask = torch.zeros_like(graph.upstream)
    for sender, receiver in edges:
        s, r = graph.sender_index(sender), graph.receiver_index(receiver)
        if not bool(graph.upstream[s, r]):
            raise InputError(f"{sender} -> {receiver} is not an edge: {sender} does not "
                             f"write before {receiver} reads")
        mask[s, r] = True
    return mask


def build_graph(model: Any, adapter: Adapter | None = None) -> Graph:
    """The component graph of ``model`` (an ``ii.Model`` or a Hugging Face causal LM), under
    its family's map from the architecture layer or ``adapter`` (an ``ii.Adapter`` by hand,
    with ``attn_norm``, ``qkv`` and, under a parallel residual, ``mlp_norm``).

    >>> build_graph(model).n_edges                                  # doctest: +SKIP
    """
    root = getattr(model, "module", model)
    adapter = adapter_for(model, adapter)   # the family's, the model's own, or discovered
    layout = attention_layout(root, adapter)
    check_values(root, adapter, layout)
    n_heads, n_kv = layout.n_heads, layout.n_kv
    senders, receivers = _nodes(adapter.n_layers, n_heads, n_kv, layout.head_senders)
    graph = Graph(adapter.name, adapter, adapter.n_layers, n_heads, n_kv, layout.head_dim,
                  layout.parallel, senders, receivers, torch.zeros(0, dtype=torch.bool),
                  _slots(layout), layout)
    graph.upstream = _upstream(graph)
    return graph


def _nodes(n_layers: int, n_heads: int, n_kv: int,
           heads: bool = True) -> tuple[list[Node], list[Node]]:
    senders, receivers = [Node("embed", -1, -1, "embed")], []
    kv = (lambda l, g: f"L{l}H{g}") if n_kv == n_heads else (lambda l, g: f"L{l}KV{g}")
    for l in range(n_layers):
        senders += ([Node(f"L{l}H{h}", l, h, "head") for h in range(n_heads)] if heads
                    else [Node(f"ATTN{l}", l, -1, "attn")])
        senders.append(Node(f"MLP{l}", l, -1, "mlp"))
        receivers += [Node(f"L{l}H{h}.q", l, h, "q") for h in range(n_heads)]
        receivers += [Node(f"{kv(l, g)}.{t}", l, g, t) for t in "kv" for g in range(n_kv)]
        receivers.append(Node(f"MLP{l}", l, -1, "mlp"))
    receivers.append(Node("logits", n_layers, -1, "logits"))
    return senders, receivers


def _upstream(graph: Graph) -> torch.Tensor:
    """``[senders, receivers]``: True where the sender writes before the receiver reads
    (``embed`` has layer -1 and ``logits`` layer ``n_layers``, so both follow the rule)."""
    send = torch.tensor([n.layer for n in graph.senders])[:, None]
    recv = torch.tensor([n.layer for n in graph.receivers])[None, :]
    heads = torch.tensor([n.role in ("head", "attn") for n in graph.senders])[:, None]
    mlps = torch.tensor([n.role == "mlp" for n in graph.receivers])[None, :]
    same_layer_mlp = heads & mlps & (send == recv) & (not graph.parallel)
    return (send < recv) | same_layer_mlp


def _slots(layout: AttentionLayout) -> list[Slot]:
    """Which projection columns each attention receiver of a layer computes (receivers: the
    q heads, then the kv heads' k, then their v, as :func:`_nodes` orders them)."""
    first = {"q": 0, "k": layout.n_heads, "v": layout.n_heads + layout.n_kv}
    return [Slot(c.path, first[c.role] + c.index, c.start, c.stop) for c in layout.columns]
