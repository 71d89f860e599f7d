"""The graph of components that edge attribution scores and circuits keep or drop.

Senders write into the residual stream: ``embed`` (the residual entering block 0: token
embeddings plus, in GPT-2, position embeddings), each head ``L{l}H{h}`` (its ``result``: its
``z`` through its slice of the out-projection, bias not included) and each ``MLP{l}`` (its
output). Receivers read a residual stream: each head's query input ``L{l}H{h}.q``, its key and
value inputs ``L{l}H{h}.k`` / ``.v`` (under GQA one per kv head: ``L{l}KV{g}.k`` / ``.v``,
read by query heads ``g * group .. (g + 1) * group - 1``), each ``MLP{l}`` input and the
``logits`` (the final norm's input). A receiver's input is the sum of the writes of the
senders upstream of it (plus the out-projection biases, which no run changes), so an edge
``u -> v`` is u's write as v reads it.

Upstream: ``embed`` feeds everything; a component of layer l feeds the heads of later layers
and the logits; a head of layer l feeds ``MLP{l}`` in sequential models (GPT-2, Llama) but
not with a parallel residual (GPT-NeoX/Pythia with ``use_parallel_residual``: attention and
MLP of a layer read the same stream).

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

from ipy_intervene.arch.sites import get_path
from ipy_intervene.errors import InputError


@dataclass(frozen=True)
class Node:
    """A sender or a receiver. ``layer`` is -1 for ``embed`` and ``n_layers`` for ``logits``;
    ``index`` is the head (or kv head) for attention, else -1; ``role`` is ``embed``,
    ``head``, ``mlp`` (senders) or ``q``, ``k``, ``v``, ``mlp``, ``logits`` (receivers)."""

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

    projection: str        # path inside the attention module: "c_attn", "q_proj", ...
    receiver: int
    start: int
    stop: int


@dataclass(frozen=True)
class Family:
    """Module names of one architecture family, inside a block and at the top."""

    blocks: str
    final_norm: str
    attn: str
    attn_norm: str
    mlp: str
    mlp_norm: str
    out_proj: str          # inside the attention module


_LLAMA = Family("model.layers", "model.norm", "self_attn", "input_layernorm", "mlp",
                "post_attention_layernorm", "o_proj")
FAMILIES: dict[str, Family] = {
    "gpt2": Family("transformer.h", "transformer.ln_f", "attn", "ln_1", "mlp", "ln_2",
                   "c_proj"),
    "gpt_neox": Family("gpt_neox.layers", "gpt_neox.final_layer_norm", "attention",
                       "input_layernorm", "mlp", "post_attention_layernorm", "dense"),
    **{name: _LLAMA for name in ("llama", "mistral", "qwen2", "qwen3")},
}


@dataclass
class Graph:
    """Senders, receivers and which sender is upstream of which receiver, for one model."""

    model_type: str
    family: Family
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    parallel: bool
    senders: list[Node]
    receivers: list[Node]
    upstream: torch.Tensor              # [senders, receivers] bool: the edges
    slots: list[Slot] = field(default_factory=list)   # one layer's q/k/v columns

    @property
    def per_layer(self) -> int:
        """Attention receivers per layer: ``n_heads`` queries, ``n_kv`` keys, ``n_kv`` values."""
        return self.n_heads + 2 * self.n_kv

    @property
    def n_edges(self) -> int:
        return int(self.upstream.sum())

    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

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

    def block(self, root: nn.Module, layer: int) -> nn.Module:
        return get_path(root, self.family.blocks)[layer]

    def part(self, root: nn.Module, layer: int, name: str) -> nn.Module:
        """A module of block ``layer`` named by a :class:`Family` field:
        ``part(root, 2, "attn_norm")``."""
        path = getattr(self.family, name)
        block = self.block(root, layer)
        if name == "out_proj":
            return get_path(get_path(block, self.family.attn), path)
        return get_path(block, path)


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


def family_of(root: nn.Module) -> tuple[str, Family]:
    config = getattr(root, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise InputError(f"edge attribution knows the architectures {', '.join(FAMILIES)}; "
                         f"got {model_type or type(root).__name__!r}")
    return model_type, FAMILIES[model_type]


def build_graph(model: Any) -> Graph:
    """The component graph of ``model`` (an ``ii.Model`` or a Hugging Face causal LM).

    >>> build_graph(model).n_edges                                  # doctest: +SKIP
    """
    root = getattr(model, "module", model)
    model_type, fam = family_of(root)
    config = root.config
    n_layers = len(get_path(root, fam.blocks))
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    attn = get_path(get_path(root, fam.blocks)[0], fam.attn)
    head_dim = int(getattr(attn, "head_dim", 0) or getattr(attn, "head_size", 0)
                   or config.hidden_size // n_heads)
    parallel = model_type == "gpt_neox" and bool(getattr(config, "use_parallel_residual", False))
    senders, receivers = _nodes(n_layers, n_heads, n_kv)
    graph = Graph(model_type, fam, n_layers, n_heads, n_kv, head_dim, parallel, senders,
                  receivers, torch.zeros(0, dtype=torch.bool),
                  _slots(model_type, n_heads, n_kv, head_dim))
    graph.upstream = _upstream(graph)
    return graph


def _nodes(n_layers: int, n_heads: int, n_kv: int) -> tuple[list[Node], list[Node]]:
    senders, receivers = [Node("embed", -1, -1, "embed")], []
    kv = (lambda l, g: f"L{l}H{g}") if n_kv == n_heads else (lambda l, g: f"L{l}KV{g}")
    for l in range(n_layers):
        senders += [Node(f"L{l}H{h}", l, h, "head") for h in range(n_heads)]
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
    heads = torch.tensor([n.role == "head" for n in graph.senders])[:, None]
    mlps = torch.tensor([n.role == "mlp" for n in graph.receivers])[None, :]
    same_layer_mlp = heads & mlps & (send == recv) & (not graph.parallel)
    return (send < recv) | same_layer_mlp


def _slots(model_type: str, n_heads: int, n_kv: int, d: int) -> list[Slot]:
    """Which projection columns each attention receiver of a layer computes."""
    q = range(n_heads)
    k = [(n_heads + g, g) for g in range(n_kv)]
    v = [(n_heads + n_kv + g, g) for g in range(n_kv)]
    if model_type == "gpt2":          # fused Conv1D c_attn: [q heads | k heads | v heads]
        width = n_heads * d
        return ([Slot("c_attn", h, h * d, (h + 1) * d) for h in q]
                + [Slot("c_attn", r, width + g * d, width + (g + 1) * d) for r, g in k]
                + [Slot("c_attn", r, 2 * width + g * d, 2 * width + (g + 1) * d) for r, g in v])
    if model_type == "gpt_neox":      # fused query_key_value: per head [q | k | v]
        return ([Slot("query_key_value", h, 3 * d * h, 3 * d * h + d) for h in q]
                + [Slot("query_key_value", r, 3 * d * g + d, 3 * d * g + 2 * d) for r, g in k]
                + [Slot("query_key_value", r, 3 * d * g + 2 * d, 3 * d * (g + 1))
                   for r, g in v])
    return ([Slot("q_proj", h, h * d, (h + 1) * d) for h in q]
            + [Slot("k_proj", r, g * d, (g + 1) * d) for r, g in k]
            + [Slot("v_proj", r, g * d, (g + 1) * d) for r, g in v])
