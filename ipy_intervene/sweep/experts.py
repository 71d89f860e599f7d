"""Mixture of experts from Python: read the routing (:func:`routing`), remove experts from a
forward (:func:`ablate_experts`) and sweep over experts (:func:`expert_sweep`). The family
facts and the per-expert arithmetic are in :mod:`ipy_intervene.arch.moe`.

An expert's site is its routing-weighted contribution to the MoE block's output. Patching
it puts the source run's contribution in place of the base run's; ablating it removes it.
Either way the router's weights of the other experts are used as they are (NOT
renormalised). One forward runs a chunk of cells, each a block of rows; each cell equals
a forward of its own (tested against a per-prompt loop of plain hooks).

>>> r = expert_sweep(model, clean, corrupt, ii.logit_diff("Mary", "John"))  # doctest: +SKIP
>>> r.values.shape                        # [layer, expert]; clean = 1, corrupted = 0
torch.Size([3, 8])
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from ipy_intervene.analysis.inputs import index_list, prepare_pair, token_labels
from ipy_intervene.analysis.metrics import as_metric
from ipy_intervene.analysis.reads import OnLogits
from ipy_intervene.arch import moe
from ipy_intervene.arch.moe import MoeLayer, Routing
from ipy_intervene.errors import InputError
from ipy_intervene.infra.hooks import HookSession, entry_point
from ipy_intervene.model.loading import warn_if_training, wrap
from ipy_intervene.sweep.heads import in_chunks
from ipy_intervene.sweep.result import SweepResult, normalised

EXPERT_SITES = ("expert_out", "expert_out_pos")
EXPERT_METHODS = ("activation", "ablation")
ExpertCell = tuple[int, int, int | None]        # layer, expert, position (None: all)


def _layers(model: Any, layers: Sequence[int] | int | None) -> list[MoeLayer]:
    """The MoE layers asked for (default: every MoE layer, the dense ones left out)."""
    if layers is None:
        layers = moe.moe_layers(model.module)
    layers = [layers] if isinstance(layers, int) else list(layers)
    return [moe.moe_layer(model.module, l) for l in layers]


def _experts(found: list[MoeLayer], experts: Sequence[int] | int | None) -> list[int]:
    if experts is None:
        return list(range(min(l.n_experts for l in found)))
    experts = [experts] if isinstance(experts, int) else list(experts)
    for layer in found[1:]:                 # every layer must have them (an error if not)
        [layer.check_expert(e) for e in experts]
    return [found[0].check_expert(e) for e in experts]


# -- reading -------------------------------------------------------------------------------

@dataclass
class RoutingResult:
    """The routing of a batch (left-padded: ``mask [batch, pos]`` marks the real tokens),
    per layer: ``logits[l] [batch, pos, n_experts]``, ``chosen[l] [batch, pos, k]``,
    ``weights[l] [batch, pos, k]`` and, for the ``experts`` asked for, ``terms[l] [batch,
    pos, len(experts), d_model]`` (each expert's contribution to ``mlp_out``)."""

    layers: list[int]
    experts: list[int]
    mask: torch.Tensor
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    chosen: dict[int, torch.Tensor] = field(default_factory=dict)
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    terms: dict[int, torch.Tensor] = field(default_factory=dict)

    def prompt(self, i: int) -> dict[str, dict[int, torch.Tensor]]:
        """Prompt ``i``'s values without the padding: ``{"logits": {layer: [pos, E]}, ...}``."""
        real = self.mask[i].bool()
        return {name: {l: x[i][real] for l, x in getattr(self, name).items()}
                for name in ("logits", "chosen", "weights", "terms")}

    def counts(self, layer: int) -> torch.Tensor:
        """How many real tokens chose each expert at ``layer``: ``[n_experts]``."""
        chosen = self.chosen[layer][self.mask.bool()]
        return torch.bincount(chosen.flatten(), minlength=self.logits[layer].shape[-1])


@entry_point
@torch.no_grad()
def routing(model: Any, inputs: Any, *, layers: Sequence[int] | int | None = None,
            experts: Sequence[int] | int | None = ()) -> RoutingResult:
    """The router logits, chosen experts, their weights (and, for ``experts``, each one's
    contribution) at every MoE layer (or ``layers``) for a prompt or a list of prompts.

    >>> r = ii.routing(model, ["The cat", "A dog ran"], experts=[0, 5])  # doctest: +SKIP
    >>> r.prompt(1)["chosen"][1]           # [3 tokens, k] experts of layer 1, no padding
    """
    model = wrap(model)
    found = _layers(model, layers)
    chosen_experts = [] if experts == () else _experts(found, experts)
    batch = model.prepare([inputs])
    result = RoutingResult([l.layer for l in found], chosen_experts,
                           batch.kwargs["attention_mask"].cpu())

    def keep(layer: MoeLayer):
        def on_routing(r: Routing) -> None:
            result.chosen[layer.layer] = r.view(r.index).clone()
            result.weights[layer.layer] = r.view(r.weights).clone()
            if chosen_experts:
                result.terms[layer.layer] = torch.stack([r.term(e) for e in chosen_experts], 2)
        return on_routing

    with HookSession() as session:
        for layer in found:
            moe.tap_routing(session, layer, keep(layer), on_logits=lambda x, l=layer.layer:
                            result.logits.__setitem__(l, x.clone()))
        model.module(**batch.kwargs)
    return result


@contextmanager
def ablate_experts(model: Any, remove: dict[int, Sequence[int] | int],
                   positions: Sequence[int] | int | None = None) -> Iterator[None]:
    """Forwards of ``model`` inside the block run without the contributions of the experts
    in ``remove`` (``{layer: experts}``) at ``positions`` of the (left-padded) batch
    (default: every position; negative: from the end). The other experts' weights are
    used as the router gave them (not renormalised).

    >>> with ii.ablate_experts(model, {1: [5], 2: 0}, positions=-1):   # doctest: +SKIP
    ...     logits = model.module(**inputs).logits
    """
    model = wrap(model)
    with HookSession() as session:
        for l, experts in remove.items():
            layer = moe.moe_layer(model.module, l)
            drop = [layer.check_expert(e) for e in ([experts] if isinstance(experts, int)
                                                    else experts)]
            moe.tap_routing(session, layer, lambda r, drop=drop: _remove(r, drop, positions))
        yield


def _remove(r: Routing, drop: list[int], positions: Sequence[int] | int | None) -> Any:
    rows = torch.ones(r.shape, dtype=torch.bool, device=r.index.device)
    if positions is not None:
        rows = torch.zeros_like(rows)
        rows[:, index_list(positions, r.shape[1], "position")] = True
    weights = r.weights
    for e in drop:
        weights = moe.without(r.index, weights, e, rows.flatten())
    return weights, None


# -- the sweep -----------------------------------------------------------------------------

@entry_point
@torch.no_grad()
def expert_sweep(model: Any, clean: Any, corrupted: Any = None, metric: Any = None, *,
                 site: str = "expert_out", method: str = "activation",
                 direction: str = "denoising", layers: Sequence[int] | None = None,
                 experts: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                 batch_size: int = 16) -> "ExpertSweepResult":
    """Each expert of each MoE layer, patched or removed, and ``metric`` measured.

    - ``method="activation"``: the source run's contribution of the expert replaces the
      base run's (denoising, default: clean into corrupted; ``direction="noising"``:
      corrupted into clean); ``values``: clean = 1, corrupted = 0.
    - ``method="ablation"``: the expert's contribution is removed from the ``clean`` run
      (``corrupted`` is not used); ``values`` = metric - clean metric (0: no effect).

    ``site="expert_out"``: at every position (grid ``[layer, expert]``);
    ``"expert_out_pos"``: at one position (grid ``[layer, pos, expert]``). ``layers``
    defaults to every MoE layer (a dense one is an error); ``experts`` to all.

    >>> ii.expert_sweep(model, clean, None, metric, method="ablation")  # doctest: +SKIP
    """
    start = time.perf_counter()
    _check(site, method, corrupted, metric, direction)
    model = wrap(model)
    warn_if_training(model)
    found = _layers(model, layers)
    chosen = _experts(found, experts)
    a, b = prepare_pair(model, clean, corrupted) if method == "activation" else (
        model.prepare([clean]),) * 2
    metric = as_metric(metric)
    bound = OnLogits(model, metric, a.size, a.length)
    per_position = site == "expert_out_pos"
    if positions is not None and not per_position:
        raise InputError("positions= needs site='expert_out_pos' (expert_out patches the "
                         "expert at every position)")
    pos = index_list(positions, a.length, "position") if per_position else []
    base, source = (b, a) if direction == "denoising" else (a, b)
    clean_terms, clean_logits = _record(model, found, chosen, {**a.kwargs, **bound.keep})
    bound.settle(clean_logits)
    other_terms, other_logits = (clean_terms, clean_logits) if method == "ablation" else \
        _record(model, found, chosen, {**b.kwargs, **bound.keep})
    terms = None if method == "ablation" else (
        clean_terms if source is a else other_terms)
    cells = [(l.layer, e, p) for l in found for p in (pos or [None]) for e in chosen]
    patch = _Patches(model.module, {l.layer: l for l in found}, {**base.kwargs, **bound.keep},
                     a.size, terms, bound)
    rows = in_chunks(patch.chunk, cells, batch_size, f"{site} {method}")
    hi, lo = float(bound(clean_logits).mean()), float(bound(other_logits).mean())
    shape = (len(found), len(pos), len(chosen)) if per_position else (len(found), len(chosen))
    per_prompt = rows.view(*shape, a.size)
    raw = per_prompt.mean(-1)
    values = raw - hi if method == "ablation" else normalised(raw, hi, lo)
    return ExpertSweepResult(
        values, raw, per_prompt, hi, float("nan") if method == "ablation" else lo,
        ("layer", "pos", "expert") if per_position else ("layer", "expert"),
        [l.layer for l in found], pos, [], token_labels(model, a), site, method,
        "ablation" if method == "ablation" else direction, repr(metric),
        time.perf_counter() - start, experts=chosen,
        extra={"metric_positions": bound.reads.describe(), **metric.no_per_prompt(),
               "routing": {l.layer: l.routing for l in found}, "renormalised": False})


def _check(site: str, method: str, corrupted: Any, metric: Any, direction: str) -> None:
    if site not in EXPERT_SITES:
        raise InputError(f"unknown expert site {site!r}; sites: {', '.join(EXPERT_SITES)}")
    if method not in EXPERT_METHODS:
        raise InputError(f"method={method!r}: expert sweeps have {', '.join(EXPERT_METHODS)}")
    if direction not in ("denoising", "noising"):
        raise InputError(f"direction={direction!r}: expected 'denoising' or 'noising'")
    if method == "activation" and corrupted is None:
        raise InputError("method='activation' needs corrupted prompts (the run to patch "
                         "into); method='ablation' needs only clean ones")
    if metric is None:
        raise InputError("a sweep needs a metric, e.g. ii.logit_diff('Mary', 'John')")


def _record(model: Any, found: list[MoeLayer], experts: list[int],
            kwargs: dict) -> tuple[dict[tuple[int, int], torch.Tensor], torch.Tensor]:
    """Each (layer, expert)'s contribution ``[batch, pos, d]`` and the logits of one run."""
    terms: dict[tuple[int, int], torch.Tensor] = {}

    def keep(layer: MoeLayer):
        def on_routing(r: Routing) -> None:
            for e in experts:
                terms[layer.layer, e] = r.term(e)
        return on_routing

    with HookSession() as session:
        for layer in found:
            moe.tap_routing(session, layer, keep(layer))
        logits = model.module(**kwargs).logits
    return terms, logits


class _Patches:
    """The patched forwards of chunks of cells: cell ``i`` is rows ``i*n..(i+1)*n``."""

    def __init__(self, module: Any, layers: dict[int, MoeLayer], kwargs: dict, n: int,
                 terms: dict[tuple[int, int], torch.Tensor] | None, bound: Any) -> None:
        self.module, self.layers, self.kwargs, self.n = module, layers, kwargs, n
        self.terms, self.bound = terms, bound

    def chunk(self, cells: list[ExpertCell]) -> torch.Tensor:
        """The metric of each (cell, prompt) row: ``[len(cells) * n]``."""
        kwargs = {k: v.repeat(len(cells), *[1] * (v.dim() - 1))
                  if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == self.n else v
                  for k, v in self.kwargs.items()}
        with HookSession() as session:
            for layer in {c[0] for c in cells}:
                mine = [(i, e, p) for i, (l, e, p) in enumerate(cells) if l == layer]
                moe.tap_routing(session, self.layers[layer],
                                lambda r, layer=layer, mine=mine: self._patch(r, layer, mine))
            return self.bound(self.module(**kwargs).logits).float()

    def _patch(self, r: Routing, layer: int, cells: list[tuple[int, int, int | None]]) -> Any:
        n = self.n
        weights, add = r.weights, torch.zeros_like(r.hidden).view(*r.shape, -1)
        for i, e, p in cells:
            rows = torch.zeros(r.shape, dtype=torch.bool, device=r.index.device)
            where = (slice(i * n, (i + 1) * n), slice(None) if p is None else p)
            rows[where] = True
            weights = moe.without(r.index, weights, e, rows.flatten())
            if self.terms is not None:
                source = self.terms[layer, e]
                add[where] = source[:, slice(None) if p is None else p].to(add.dtype)
        return weights, None if self.terms is None else add.view(r.hidden.shape)


@dataclass(repr=False)
class ExpertSweepResult(SweepResult):
    """A :class:`SweepResult` whose last dimension is experts (``dims`` ``("layer",
    "expert")`` or ``("layer", "pos", "expert")``); ``experts`` names them."""

    experts: list[int] = field(default_factory=list)

    def _axis(self, dim: str) -> list[int]:
        return self.experts if dim == "expert" else super()._axis(dim)

    def _cell_at(self, index: tuple[int, ...]) -> dict[str, Any]:
        cell: dict[str, Any] = {}
        for dim, i in zip(self.dims, index):
            if dim == "pos":
                cell["pos"] = self.positions[i]
                cell["token"] = self.tokens[self.positions[i]]
            else:
                cell[dim] = self._axis(dim)[i]
        cell["value"] = float(self.values[index])
        return cell

    def __repr__(self) -> str:
        best = ", ".join(f"L{c['layer']}{' ' + c['token'] if 'token' in c else ''} "
                         f"E{c['expert']}: {c['value']:.3g}" for c in self.top(3))
        shape = " x ".join(f"{len(self._axis(d))} {d}s" for d in self.dims)
        return (f"ExpertSweepResult({self.method}, {self.direction}, site={self.site}, "
                f"{shape}; metric {self.metric}: clean {self.clean:.4g}; largest: {best}; "
                f"{self.seconds:.2f} s)")

    def figure(self, pos: int | None = None) -> Any:
        """A plotly heatmap: layers up, experts across (at position ``pos``, or the one
        with the largest effect, for ``expert_out_pos``)."""
        import plotly.graph_objects as go

        values = self.values
        if self.dims[1] == "pos":
            index = int(values.abs().nan_to_num(0.0).amax(dim=(0, 2)).argmax()) if pos is None \
                else self.positions.index(pos)
            values = values[:, index]
        limit = float(values.abs().nan_to_num(0.0).max()) or 1.0
        fig = go.Figure(go.Heatmap(z=values.tolist(), x=[f"E{e}" for e in self.experts],
                                   y=[f"L{l}" for l in self.layers], colorscale="RdBu",
                                   zmid=0.0, zmin=-limit, zmax=limit))
        return fig.update_layout(title=f"{self.method} sweep over experts ({self.site}): "
                                       f"{self.metric}", xaxis_title="expert",
                                 yaxis_title="layer")

    def show(self) -> Any:
        """The heatmap, live and as a static SVG (``widgets.static.StaticFigure``)."""
        from ipy_intervene.widgets.static import StaticFigure

        return StaticFigure(self.figure())

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return {**self.show()._repr_mimebundle_(include, exclude), "text/plain": repr(self)}


def from_spec(spec: Any, start: float) -> ExpertSweepResult:
    """The runner of ``ii.patch_sweep(..., site="expert_out" | "expert_out_pos")`` (method
    ``activation``; ``heads=`` are the experts), for ``sweep/api.py``'s ``RUNNERS``."""
    result = expert_sweep(*spec.pair, site=spec.site, direction=spec.direction,
                          layers=spec.layers, experts=spec.heads, positions=spec.positions,
                          batch_size=spec.batch_size or 16)
    result.seconds = time.perf_counter() - start
    return result
