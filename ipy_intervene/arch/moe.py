"""Mixture of experts: every fact about the MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, GPT-OSS, DeepSeek-V3) and the exact per-expert arithmetic the MoE sites read.

In transformers 5 the routed experts of a layer are one fused module holding 3-D weights
(``mlp.experts.gate_up_proj[e]``), called as ``experts(x [tokens, d], index [tokens, k],
weights [tokens, k])``: the sum over each token's ``k`` chosen experts of ``weight * expert(x)``.
The router returns ``(logits [tokens, n_experts], weights [tokens, k], index [tokens, k])``.
Every site here is ``[batch, pos, ...]`` (tokens are the batch's rows, batch-major):

    router_logits   [batch, pos, n_experts]  what the router scores experts with (read-only)
    experts_chosen  [batch, pos, k]          the chosen experts' indices (read-only)
    router_weights  [batch, pos, k]          their weights, as the experts receive them;
                                             a change is used as it is (not renormalised)
    experts[e]      [batch, pos, d_model]    expert e's routing-weighted contribution to
                                             mlp_out (0 where e is not chosen)

An expert's contribution is the family's own experts forward run on the tokens routed to
``e`` alone (``index = e``, its weight), so it is what the fused forward adds for ``e``,
whatever ``experts_implementation`` is set. A changed contribution replaces it: ``e``'s
weight is zeroed at every token (the family's forward then adds exactly nothing for it)
and the new value is added; so ablating = writing zeros, and the other experts' weights
are NOT renormalised. ``mlp_out`` = the sum of the contributions + the shared expert
(Qwen2-MoE: ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``; DeepSeek-V3:
``shared_experts(x)``).

>>> import ipy_intervene as ii, torch                                  # doctest: +SKIP
>>> layer = moe_layer(model.module, 1)                                 # doctest: +SKIP
>>> layer.n_experts, layer.top_k, layer.shared                        # doctest: +SKIP
(4, 2, None)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ipy_intervene.errors import SiteError
from ipy_intervene.infra.hooks import HookSession, input_key

MOE_SITES = ("router_logits", "experts_chosen", "router_weights")
READ_ONLY = ("router_logits", "experts_chosen")


@dataclass(frozen=True)
class MoeFamily:
    """Where an MoE family keeps its parts (children of the block's ``mlp``) and how it routes."""

    router: str                      # child returning (logits, top-k weights, top-k index)
    routing: str                     # how the weights come from the logits, in words
    shared: tuple[str, ...] = ()     # shared expert (and its gate), added to every token
    dense: str = ""                  # the config fields that make some layers dense
    tuple_output: bool = False       # the MoE block returns (hidden, router scores)
    experts: str = "experts"
    blocks: str = "model.layers"
    mlp: str = "mlp"


_SOFTMAX = "softmax over all experts, top-k"
FAMILIES: dict[str, MoeFamily] = {
    # transformers/models/<family>/modeling_<family>.py, 5.x
    "mixtral": MoeFamily("gate", _SOFTMAX + ", renormalised to sum 1"),
    "qwen2_moe": MoeFamily("gate", _SOFTMAX + ", renormalised if config.norm_topk_prob",
                           shared=("shared_expert", "shared_expert_gate"),
                           dense="mlp_only_layers / decoder_sparse_step"),
    "qwen3_moe": MoeFamily("gate", _SOFTMAX + ", renormalised if config.norm_topk_prob",
                           dense="mlp_only_layers / decoder_sparse_step"),
    "olmoe": MoeFamily("gate", _SOFTMAX + ", renormalised if config.norm_topk_prob"),
    "gpt_oss": MoeFamily("router", "top-k of the logits (router bias included), softmax over "
                         "those k", tuple_output=True),
    "deepseek_v3": MoeFamily("gate", "sigmoid scores; top-k within the best topk_group groups "
                             "of scores + e_score_correction_bias; the chosen sigmoid scores, "
                             "renormalised if config.norm_topk_prob, times "
                             "routed_scaling_factor", shared=("shared_experts",),
                             dense="first_k_dense_replace"),
}


def family_of(model: nn.Module) -> tuple[str, MoeFamily]:
    """``(model_type, family)`` of a Hugging Face MoE model; a SiteError for any other."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        name = repr(model_type or type(model).__name__)
        known = f"expert sites exist in: {', '.join(FAMILIES)}"
        if any(_is_fused_experts(m) for m in model.modules()):
            raise SiteError(f"{name} has fused experts, but ipy_intervene does not know where "
                            f"its router and experts are ({known}); its MoE block's output "
                            "is the site mlp_out")
        raise SiteError(f"{name} is not a mixture-of-experts family ipy_intervene knows "
                        f"({known}); its MLP is dense: use the site mlp_out")
    return model_type, family


@dataclass(frozen=True)
class MoeLayer:
    """One MoE layer of a model: its block's MLP, router, fused experts and shared parts."""

    family: str
    layer: int
    path: str                       # the MLP's path in a cell: "model.layers[1].mlp"
    block: nn.Module                # the MoE block (the MLP)
    router: nn.Module
    experts: nn.Module
    shared: tuple[nn.Module, ...]
    n_experts: int
    top_k: int
    routing: str

    def check_expert(self, expert: int) -> int:
        """``expert`` (negative: from the end) checked against the layer's experts."""
        n = self.n_experts
        if isinstance(expert, bool) or not isinstance(expert, int) or not -n <= expert < n:
            raise SiteError(f"expert {expert!r} is out of range: {self.family} layer "
                            f"{self.layer} ({self.path}.experts) has {n} experts "
                            f"(0..{n - 1}, or -{n}..-1)")
        return expert % n


def moe_layer(model: nn.Module, layer: int) -> MoeLayer:
    """The MoE layer ``layer`` of ``model`` (a Hugging Face causal LM, or ``ii.Model``);
    SiteErrors for a model that is not MoE, a layer out of range and a dense layer.

    >>> moe_layer(model.module, 1).n_experts                     # doctest: +SKIP
    4
    """
    model = getattr(model, "module", model)
    name, family = family_of(model)
    blocks = _get(model, family.blocks)
    n = len(blocks)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise SiteError(f"layer {layer!r} is out of range: this {name} model has {n} layers "
                        f"(0..{n - 1}, or -{n}..-1)")
    layer %= n
    path = f"{family.blocks}[{layer}].{family.mlp}"
    block = _get(blocks[layer], family.mlp)
    parts = [block._modules.get(p) for p in (family.router, family.experts, *family.shared)]
    if any(p is None for p in parts):
        sparse = [i for i in range(n) if _is_moe(_get(blocks[i], family.mlp), family)]
        raise SiteError(f"{name} layer {layer} is dense ({path} is {type(block).__name__}, "
                        f"set by config.{family.dense or 'its layer layout'}): it has no "
                        f"router or experts; its MLP is the site mlp_out. MoE layers of this "
                        f"model: {sparse or 'none'}")
    router, experts, *shared = parts
    return MoeLayer(name, layer, path, block, router, experts, tuple(shared),
                    int(experts.num_experts), int(router.top_k), family.routing)


def moe_layers(model: nn.Module) -> list[int]:
    """The indices of ``model``'s MoE layers (its dense ones left out)."""
    model = getattr(model, "module", model)
    _, family = family_of(model)
    return [i for i, b in enumerate(_get(model, family.blocks))
            if _is_moe(_get(b, family.mlp), family)]


def _is_moe(block: nn.Module, family: MoeFamily) -> bool:
    return all(p in block._modules for p in (family.router, family.experts))


def _get(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def expert_term(experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor,
                weights: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s routing-weighted contribution ``[tokens, d]`` to the fused experts'
    output (zeros where it is not chosen): the family's own experts forward on the tokens
    routed to it, with ``index = expert`` and its weight there.

    >>> expert_term(layer.experts, x, index, weights, 2)         # doctest: +SKIP
    """
    hit = index == expert                                   # [tokens, k]; at most one per row
    rows = hit.any(-1)
    out = torch.zeros_like(hidden)
    if bool(rows.any()):
        chosen = torch.full((int(rows.sum()), 1), expert, dtype=index.dtype, device=index.device)
        term = experts.forward(hidden[rows], chosen, weights[hit].unsqueeze(-1))
        out[rows] = term.to(out.dtype)
    return out


def without(index: torch.Tensor, weights: torch.Tensor, expert: int,
            rows: torch.Tensor | None = None) -> torch.Tensor:
    """``weights`` with ``expert``'s weight set to 0 (at the tokens where ``rows`` is True;
    all tokens when None): the family's forward then adds nothing for it; the other
    weights are left as they are (not renormalised)."""
    hit = index == expert
    if rows is not None:
        hit = hit & rows.unsqueeze(-1)
    return weights.masked_fill(hit, 0)


@dataclass
class Routing:
    """What the experts of one MoE layer received in one forward, ``[batch, pos, ...]``."""

    layer: MoeLayer
    shape: tuple[int, int]
    hidden: torch.Tensor            # [tokens, d]: the experts' input
    index: torch.Tensor             # [tokens, k]
    weights: torch.Tensor           # [tokens, k]

    def view(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*self.shape, *x.shape[1:])

    def term(self, expert: int) -> torch.Tensor:
        """Expert ``expert``'s contribution ``[batch, pos, d]``."""
        e = self.layer.check_expert(expert)
        return self.view(expert_term(self.layer.experts, self.hidden, self.index,
                                     self.weights, e))


OnRouting = Callable[[Routing], "tuple[torch.Tensor, torch.Tensor | None] | None"]


def tap_routing(session: HookSession, layer: MoeLayer, fn: OnRouting,
                on_logits: Callable[[torch.Tensor], None] | None = None) -> None:
    """Hooks for ``session``: ``fn(routing)`` before layer's experts run; a returned
    ``(weights [tokens, k], add [tokens, d] or None)`` replaces the weights the experts get
    and adds ``add`` to their output. ``on_logits(logits [batch, pos, n_experts])`` after
    the router runs."""
    state: dict[str, Any] = {}

    def block_pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        key = input_key(args, kwargs)
        x = args[key] if isinstance(key, int) else kwargs[key]
        state["shape"] = tuple(x.shape[:2])

    def router_post(module: nn.Module, args: tuple, output: Any) -> None:
        if on_logits is not None:
            on_logits(output[0].view(*state["shape"], -1))

    def experts_pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        hidden, index, weights = _experts_args(args, kwargs)
        state.pop("add", None)
        got = fn(Routing(layer, state["shape"], hidden, index, weights))
        if got is None:
            return None
        new_weights, state["add"] = got
        return (hidden, index, new_weights), {}

    def experts_post(module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        add = state.pop("add", None)
        return None if add is None else output + add.to(output.dtype)

    session.pre(layer.block, block_pre)
    session.post(layer.router, router_post)
    session.pre(layer.experts, experts_pre)
    session.post(layer.experts, experts_post)


def _experts_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    """(hidden, index, weights) of a fused experts call, positional or by keyword."""
    values = list(args) + list(kwargs.values())
    if len(values) != 3:
        raise SiteError(f"the fused experts were called with {len(values)} arguments; "
                        "expected (hidden_states, top_k_index, top_k_weights)")
    return tuple(values)  # type: ignore[return-value]


# -- the sites a cell reads and writes (hook points; the trace drives them) ----------------

class MoePoint(nn.Module):
    """A value of an MoE layer as a module that returns its input (hooks on it read and
    change the value); not a child of the model (its state is unchanged)."""

    def __init__(self, name: str, expert: int | None = None) -> None:
        super().__init__()
        self.name, self.expert = name, expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return self.name if self.expert is None else f"experts[{self.expert}]"


_points: "weakref.WeakKeyDictionary[nn.Module, dict[Any, MoePoint]]" = (
    weakref.WeakKeyDictionary())


def point(module: nn.Module, name: str) -> MoePoint | None:
    """The site ``name`` (``router_logits``, ``experts_chosen``, ``router_weights``) of an
    MoE block (``model.model.layers[1].mlp``); None for other modules or names."""
    if name not in MOE_SITES or not _is_block(module):
        return None
    return _table(module).setdefault(name, MoePoint(name))


def expert_point(module: nn.Module, expert: Any) -> MoePoint | None:
    """``experts[e]`` of fused experts (``model.model.layers[1].mlp.experts[5]``): expert
    ``e``'s contribution; None when ``module`` is not fused MoE experts; a SiteError for an
    index out of range."""
    if not _is_fused_experts(module):
        return None
    n = int(module.num_experts)
    if isinstance(expert, bool) or not isinstance(expert, int) or not -n <= expert < n:
        raise SiteError(f"expert {expert!r} is out of range: {type(module).__name__} has {n} "
                        f"experts (0..{n - 1}, or -{n}..-1)")
    e = expert % n
    return _table(module).setdefault(e, MoePoint("expert_out", e))


def owner(p: nn.Module) -> nn.Module | None:
    """The MoE block or fused experts module a hook point belongs to."""
    for module, table in _points.items():
        if any(q is p for q in table.values()):
            return module
    return None


def _table(module: nn.Module) -> dict[Any, MoePoint]:
    table = _points.get(module)
    if table is None:
        table = _points[module] = {}
    return table


def _is_block(module: nn.Module) -> bool:
    return any(_is_moe(module, f) and type(module).__module__.startswith("transformers.")
               for f in FAMILIES.values())


def _is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused experts: 3-D weights in one module (``down_proj [e, ., .]``)."""
    weight = getattr(module, "down_proj", None)
    return hasattr(module, "num_experts") and isinstance(weight, nn.Parameter) and \
        weight.dim() == 3


def use_sites(session: HookSession, model: nn.Module) -> None:
    """For ``session`` (a trace's), drive the MoE sites of every MoE layer of ``model``:
    each site's hook point sees its value; a changed ``router_weights`` or ``experts[e]``
    changes the forward (see the module docstring)."""
    model = getattr(model, "module", model)
    for index in moe_layers(model):
        layer = moe_layer(model, index)
        block, experts = _points.get(layer.block, {}), _points.get(layer.experts, {})
        tap_routing(session, layer, lambda r, b=block, e=experts: _drive(r, b, e),
                    on_logits=lambda x, b=block, layer=layer: _read_only(
                        layer, b.get("router_logits"), x))


def _used(p: MoePoint | None) -> bool:
    return p is not None and bool(p._forward_hooks or p._forward_pre_hooks)


def _read_only(layer: MoeLayer, p: MoePoint | None, x: torch.Tensor) -> None:
    if not _used(p):
        return
    version = x._version
    if p(x) is not x or x._version != version:
        raise SiteError(f"{layer.path}.{p.name} is read-only: the {layer.family} router has "
                        f"already chosen the experts from it ({layer.routing}). To change "
                        f"the routing, write {layer.path}.router_weights, or an expert's "
                        f"contribution {layer.path}.experts[e]")


def _drive(r: Routing, block: dict, experts: dict) -> Any:
    """The hook points of one layer's routing, in forward order; the changed weights and
    what to add to the experts' output, or None when nothing changed."""
    _read_only(r.layer, block.get("experts_chosen"), r.view(r.index))
    changed, add = False, torch.zeros_like(r.hidden)
    p = block.get("router_weights")
    if _used(p):
        new = _through(p, r.view(r.weights).clone())
        if new is not None:
            r.weights, changed = new.reshape(r.weights.shape).to(r.weights.dtype), True
    for e, p in sorted(experts.items()):
        if not _used(p):
            continue
        term = r.term(e)
        new = _through(p, term.clone())
        if new is None:
            continue
        new = new.reshape(r.hidden.shape).to(term.dtype)
        rows = (new != term.reshape(new.shape)).any(-1)   # only where the cell changed it
        r.weights, changed = without(r.index, r.weights, e, rows), True
        add[rows] += new[rows]
    return (r.weights, add) if changed else None


def _through(p: MoePoint, x: torch.Tensor) -> torch.Tensor | None:
    """``x`` through the hook point; the new value if a hook replaced or edited it."""
    version = x._version
    new = p(x)
    return new if new is not x or x._version != version else None
