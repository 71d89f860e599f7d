"""AtP* (Kramár et al. 2024): attribution patching with the QK fix and GradDrop.

Plain attribution patching estimates a cell's effect as ``(source - base) . d metric / d x``
at the base run. AtP* changes two things:

- **QK fix** (sites ``head_q``, ``head_k`` and their ``_pos`` forms): a query or key changes
  the output only through the attention softmax, where a linear estimate fails when the
  softmax saturates (its gradient vanishes although patching flips where the head looks).
  The fix recomputes the pattern exactly, with the patched queries (or keys) and the model's
  own eager attention, and linearises only after it: ``sum (A_patched - A_base) *
  d metric / d A``. Every other site (``head_out``, ``head_out_pos``, ``head_v``,
  ``attn_out``, ``mlp_out``) lies after its own head's softmax, so its plain term needs no
  fix and ``qk_fix`` leaves it unchanged.
- **GradDrop**: the estimate ``I_l`` is computed again with the gradient through layer
  ``l``'s residual contribution cut (only the skip path of layer ``l`` passes gradient), for
  each layer ``l``; a component of layer ``m`` has ``I_l = I`` for ``l < m`` and ``I_m = 0``.
  AtP* reports ``mean over prompts of sum_l |I_l| / (L - 1)``: a **magnitude**, which cannot
  cancel to zero the way a direct and an indirect effect of opposite signs can. With
  ``grad_drop=True`` a cell's value is that magnitude, on the side of the unpatched run
  that moves towards the other run (``values`` >= 0 when denoising); the signed estimate
  (QK fix, no GradDrop) is kept in ``result.extra["signed_values"]``.

Cost (``L`` layers, first grid layer ``m0``; measured in ``benchmarks/atp_star.py``):
2 forwards (source without autograd, base with it) and 1 backward, as plain attribution;
GradDrop adds ``L - 1 - m0`` backwards over the same base graph (kept in memory until the
last one); the QK fix adds attention-only calls per grid layer: 1 (``head_q``, ``head_k``),
or one per grid position, batched (``head_k_pos``), plus one to check the recomputation.
``result.extra["cost"]`` has the counts of the run.

>>> r = sweep(model, clean, corrupt, ii.logit_diff("Mary", "John"), site="head_q")  # doctest: +SKIP
>>> r.top(3)                                                                          # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch

from ipy_intervene.analysis.inputs import index_list, prepare_pair, token_labels
from ipy_intervene.analysis.metrics import as_metric
from ipy_intervene.arch.attention import site_point
from ipy_intervene.arch.sites import MODULE_SITES, Adapter, SiteKind, adapter_for, get_path
from ipy_intervene.errors import InputError, SiteError
from ipy_intervene.infra.hooks import entry_point
from ipy_intervene.model.loading import warn_if_training, wrap
from ipy_intervene.sweep import qk_fix as fix
from ipy_intervene.sweep.atp_runs import GradRecording, Wanted, base_run, source_run
from ipy_intervene.sweep.attribution import _effect
from ipy_intervene.sweep.heads import HEAD_SITES
from ipy_intervene.sweep.result import SweepResult, normalised

COMPONENT_SITES = ("attn_out", "mlp_out", "head_out", "head_out_pos")
HEAD_INPUT_SITES = tuple(s for s in HEAD_SITES if not s.startswith("head_pattern"))
ATP_SITES = (*COMPONENT_SITES, *HEAD_INPUT_SITES)


@dataclass
class _Grid:
    """The cells: ``kind`` for module sites, ``name`` (q, k, v) for a head's inputs."""

    site: str
    kind: SiteKind | None
    name: str | None
    per_position: bool
    layers: list[int]
    positions: list[int]
    heads: list[int]

    @property
    def dims(self) -> tuple[str, ...]:
        if self.kind is not None and not self.kind.per_head:
            return ("layer", "pos")
        return ("layer", "pos", "head") if self.per_position else ("layer", "head")

    @property
    def shape(self) -> tuple[int, ...]:
        sizes = {"layer": len(self.layers), "pos": len(self.positions), "head": len(self.heads)}
        return tuple(sizes[d] for d in self.dims)


@entry_point
def sweep(model: Any, clean: Any, corrupted: Any, metric: Any, *, site: str,
          layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
          heads: Sequence[int] | None = None, direction: str = "denoising",
          batch_size: int | None = None, grad_drop: bool = True,
          qk_fix: bool = True) -> SweepResult:
    """AtP* estimates of every cell of ``site`` (see the module docstring), as a
    :class:`SweepResult` shaped like ``ii.patch_sweep``'s for the same site.

    ``batch_size`` caps the key positions whose patterns are recomputed together
    (``head_k_pos``). ``qk_fix=False, grad_drop=False`` is plain attribution patching.

    >>> sweep(model, clean, corrupt, metric, site="head_out", grad_drop=True)  # doctest: +SKIP
    """
    start = time.perf_counter()
    if site not in ATP_SITES:
        raise SiteError(f"AtP* sweeps the sites {', '.join(ATP_SITES)}; got {site!r}")
    if direction not in ("denoising", "noising"):
        raise InputError(f"direction={direction!r} is not one of: denoising, noising")
    model = wrap(model)
    warn_if_training(model)
    adapter = adapter_for(model)
    a, base_batch, source_batch, metric, bound, logit_positions = estimate_inputs(
        model, clean, corrupted, metric, direction)
    grid, wanted = _plan(model, adapter, site, qk_fix, a.length, layers, positions)
    source = source_run(model, adapter, source_batch.kwargs, wanted, logit_positions, bound)
    base = base_run(model, adapter, base_batch.kwargs, wanted, logit_positions, bound, metric)
    grid.heads = index_list(heads, _head_count(grid, adapter, base), "head")
    estimates, cost = _estimates(model, adapter, grid, base, source, grad_drop, qk_fix,
                                 batch_size)
    signed = torch.cat([estimates[l][0] for l in grid.layers])
    rows = base.scores[None] + signed
    if grad_drop:
        side = 1.0 if direction == "denoising" else -1.0
        span = float(source.scores.mean() - base.scores.mean()) * side
        rows = base.scores[None] + side * (1.0 if span >= 0 else -1.0) * torch.cat(
            [_grad_drop(estimates[l], l, adapter.n_layers) for l in grid.layers])
    baselines = (float(source.scores.mean()), float(base.scores.mean()))
    if direction == "noising":
        baselines = baselines[::-1]
    extra = {"qk_fix": qk_fix, "grad_drop": grad_drop, "cost": cost,
             "estimate": "magnitude" if grad_drop else "signed",
             **metric.no_per_prompt()}
    result = _result(grid, rows, baselines, a.size, token_labels(model, a), direction,
                     repr(metric), extra)
    result.extra["signed_values"] = normalised(
        (base.scores[None] + signed).float().cpu().mean(-1), *baselines,
        warn=False).view(grid.shape)  # `values` already warned
    result.seconds = time.perf_counter() - start
    return result


class EstimateInputs(NamedTuple):
    """What an attribution estimate runs on: the clean batch, the batch patched into
    (``base``) and the one patched from (``source``) as ``direction`` says, the metric, the
    metric bound to the batch, and the logit positions it reads."""

    clean: Any
    base: Any
    source: Any
    metric: Any
    bound: Any
    logit_positions: list[int]


def estimate_inputs(model: Any, clean: Any, corrupted: Any, metric: Any,
                    direction: str) -> EstimateInputs:
    """The inputs of AtP* (and the latent sweeps' AtP*) for ``direction``.

    >>> a, base, source, metric, bound, reads = estimate_inputs(model, clean, corrupt,
    ...                                                         metric, "denoising")  # doctest: +SKIP
    """
    a, b = prepare_pair(model, clean, corrupted)
    base, source = (b, a) if direction == "denoising" else (a, b)
    metric = as_metric(metric)
    reads = (list(range(a.length)) if metric.positions is None
             else sorted({p % a.length for p in metric.positions}))
    return EstimateInputs(a, base, source, metric, metric.bind(model, a.size), reads)


def _plan(model: Any, adapter: Adapter, site: str, qk_fix: bool, length: int,
          layers: Sequence[int] | None,
          positions: Sequence[int] | None) -> tuple[_Grid, Wanted]:
    layer_list = index_list(layers, adapter.n_layers, "layer")
    position_list = index_list(positions, length, "position")
    if site in COMPONENT_SITES:
        kind = MODULE_SITES[site]
        adapter.module(model.module, site, 0)  # a clear error for a site the model lacks
        grid = _Grid(site, kind, None, kind.per_position, layer_list, position_list, [])
        return grid, Wanted(sorted(set(layer_list)), kind=kind)
    name, per_position = HEAD_SITES[site]
    site_point(model.module, adapter, 0, name)  # a clear error without attention sites
    fixed = qk_fix and name in ("q", "k")
    grid = _Grid(site, None, name, per_position, layer_list,
                 position_list if per_position else [], [])
    needs = ("q", "k", "v", "pattern") if fixed else (name,)
    return grid, Wanted(sorted(set(layer_list)), attention=needs)


def _head_count(grid: _Grid, adapter: Adapter, base: GradRecording) -> int:
    if grid.name is None:
        return adapter.n_heads
    return int(base.values[(grid.layers[0], grid.name)].shape[1])


def _estimates(model: Any, adapter: Adapter, grid: _Grid, base: GradRecording,
               source: GradRecording, grad_drop: bool, qk_fix: bool,
               batch_size: int | None) -> tuple[dict[int, torch.Tensor], dict[str, int]]:
    """Per grid layer ``[passes, cells, prompts]``: pass 0 plain, pass i with layer
    ``layer + i`` dropped."""
    fixed = qk_fix and grid.name in ("q", "k")
    layers = sorted(set(grid.layers))
    tensors = {l: _graded(grid, base, l, fixed) for l in layers}
    grads = _split(base, tensors, layers, None)
    if grad_drop:
        for dropped in range(layers[0] + 1, adapter.n_layers):
            earlier = [l for l in layers if l < dropped]
            for l, g in _split(base, tensors, earlier, dropped).items():
                grads[l] += g
    calls = 0
    out = {}
    for l in layers:
        stacked = torch.stack(grads[l])
        if grid.kind is not None:
            out[l] = torch.stack([_effect(source.sites[l], base.sites[l].detach(), g, grid,
                                          adapter.n_heads) for g in stacked]).float()
            continue
        terms, used = _head_terms(model, adapter, grid, base, source, l, stacked, fixed,
                                  batch_size)
        calls += used
        out[l] = _cells(terms[:, :, grid.heads], grid.per_position)
    cost = {"forwards": 2, "backwards": base.backwards, "attention_calls": calls}
    return out, cost


def _graded(grid: _Grid, base: GradRecording, layer: int, fixed: bool) -> torch.Tensor:
    if grid.kind is not None:
        return base.sites[layer]
    return base.values[(layer, "pattern" if fixed else grid.name)]


def _split(base: GradRecording, tensors: dict[int, torch.Tensor], layers: list[int],
           dropped: int | None) -> dict[int, list[torch.Tensor]]:
    grads = base.backward([tensors[l] for l in layers], dropped)
    return {l: [g.detach()] for l, g in zip(layers, grads)}


def _head_terms(model: Any, adapter: Adapter, grid: _Grid, base: GradRecording,
                source: GradRecording, layer: int, grads: torch.Tensor, fixed: bool,
                batch_size: int | None) -> tuple[torch.Tensor, int]:
    """``[passes, prompts, heads, cells_pos]`` for a head input site at one layer."""
    positions = grid.positions if grid.per_position else None
    name = grid.name
    if not fixed:
        delta = source.values[(layer, name)] - base.values[(layer, name)].detach()
        return fix.linear(delta, grads, positions), 0
    owner = get_path(adapter.block(model.module, layer), adapter.attn)
    values = {k: base.values[(layer, k)].detach() for k in ("q", "k", "v", "pattern")}
    call = base.calls[owner]
    with torch.no_grad():
        fix.check_recompute(owner, call, values, layer)
        if name == "q":
            return fix.q_fix(owner, call, values, source.values[(layer, "q")], grads,
                             positions), 2
        step = batch_size or fix.chunk_positions(values)
        terms = fix.k_fix(owner, call, values, source.values[(layer, "k")], grads, positions,
                          step)
        return terms, 1 + (1 if positions is None else math.ceil(len(positions) / step))


def _cells(terms: torch.Tensor, per_position: bool) -> torch.Tensor:
    """``[n, B, heads, C]`` -> ``[n, cells, B]`` in the grid's order (position-major)."""
    n, batch = terms.shape[:2]
    if not per_position:
        return terms.sum(-1).permute(0, 2, 1)
    return terms.permute(0, 3, 2, 1).reshape(n, -1, batch)


def _grad_drop(estimates: torch.Tensor, layer: int, n_layers: int) -> torch.Tensor:
    """``sum_l |I_l| / (L - 1)``: ``I_l = I`` for the ``layer`` earlier layers, 0 for the
    cell's own layer, passes 1.. for the later ones."""
    plain = estimates[0].abs()
    if n_layers == 1:
        return plain
    return (layer * plain + estimates[1:].abs().sum(0)) / (n_layers - 1)


def _result(grid: _Grid, rows: torch.Tensor, baselines: tuple[float, float], n: int,
            tokens: list[str], direction: str, metric: str, extra: dict) -> SweepResult:
    per_prompt = rows.view(rows.shape[0], -1, n).mean(1).float().cpu()
    raw = per_prompt.mean(-1)
    clean, corrupted = baselines
    values = normalised(raw, clean, corrupted)
    shape = grid.shape
    return SweepResult(
        values=values.view(shape), raw=raw.view(shape),
        prompt_values=per_prompt.view(*shape, n), clean=clean, corrupted=corrupted,
        dims=grid.dims, layers=grid.layers, positions=grid.positions, heads=grid.heads,
        tokens=tokens, site=grid.site, method="atp*", direction=direction, metric=metric,
        seconds=0.0, extra=extra)
