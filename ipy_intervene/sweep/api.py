"""``ii.patch_sweep``: the Python API the ``%patch_sweep`` magic is a thin layer over."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ipy_intervene.errors import InputError
from ipy_intervene.hooks import entry_point
from ipy_intervene.loading import warn_if_training, wrap
from ipy_intervene.model import Model
from ipy_intervene.sites import SITES, Adapter, SiteKind, adapter_for, site_kind
from ipy_intervene.sweep import (atp_star, attribution, choices, cluster as clusters, custom,
                                 latent_atp, latents as latent_sites, memory)
from ipy_intervene.sweep.heads import SITES as HEAD_SITES, head_sweep
from ipy_intervene.sweep.paths import path_patch
from ipy_intervene.sweep.inputs import index_list
from ipy_intervene.sweep.record import record
from ipy_intervene.sweep.result import SweepResult, normalised
from ipy_intervene.sweep.runs import CellPatcher, Run, prepare
from ipy_intervene.sweep.staircase import Cell, Engine

METHODS = ("activation", "attribution", "atp*", "noise", "path")
DIRECTIONS = ("denoising", "noising")


@dataclass
class Grid:
    """The cells of a sweep and the shape they fill."""

    kind: SiteKind
    layers: list[int]
    positions: list[int]
    heads: list[int]
    window: int
    n_layers: int

    @property
    def dims(self) -> tuple[str, ...]:
        if not self.kind.per_head:
            return ("layer", "pos")
        return ("layer", "pos", "head") if self.kind.per_position else ("layer", "head")

    @property
    def shape(self) -> tuple[int, ...]:
        sizes = {"layer": len(self.layers), "pos": len(self.positions), "head": len(self.heads)}
        return tuple(sizes[d] for d in self.dims)

    def cells(self) -> list[Cell]:
        positions = self.positions if self.kind.per_position else [None]
        heads = self.heads if self.kind.per_head else [None]
        return [Cell(self.window_of(layer), pos, head)
                for layer in self.layers for pos in positions for head in heads]

    def window_of(self, layer: int) -> tuple[int, ...]:
        """ROME's window: ``window`` layers centred on ``layer``, clipped to the model."""
        low = max(0, layer - self.window // 2)
        high = min(self.n_layers, layer - (-self.window // 2))
        return tuple(range(low, high))

    def patched_layers(self) -> list[int]:
        return sorted({l for layer in self.layers for l in self.window_of(layer)})


@entry_point
def patch_sweep(model: Any, clean: Any, corrupted: Any = None, metric: Any = None, *,
                site: str = "resid_pre", method: str = "activation",
                direction: str = "denoising", layers: Sequence[int] | None = None,
                positions: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                batch_size: int | None = None, memory_fraction: float = 0.25,
                subject: Any = None, samples: int = 10, noise: float = 3.0,
                noise_std: float | None = None, seed: int = 0, window: int = 1,
                adapter: Adapter | None = None, receivers: Any = "logits",
                receiver_input: str = "q", cluster: Any = None,
                latents: Sequence[int] | None = None, qk_fix: bool | None = None,
                grad_drop: bool | None = None, dictionary: Any = None
                ) -> SweepResult | dict[str, SweepResult]:
    """Patch every (layer, position[, head]) of ``site`` and measure ``metric``.

    - ``method="activation"``: exact. Denoising (default) patches the clean activation into
      the corrupted run; ``direction="noising"`` patches the corrupted one into the clean run.
    - ``method="attribution"``: the first-order estimate ``(clean - corrupted) . grad`` of the
      same effect, from one clean forward, one corrupted forward and one backward.
    - ``method="atp*"``: AtP* (Kramar et al. 2024): attribution patching with the QK fix
      (patterns under patched queries/keys recomputed exactly) and GradDrop, on
      ``attn_out``, ``mlp_out``, ``head_out(_pos)`` and ``head_q/k/v(_pos)``; see
      ``sweep/atp_star.py`` for its cost and ``ii.screen_and_verify`` to check it exactly.
      ``qk_fix=False`` / ``grad_drop=False`` turn either part off (both off: plain
      attribution patching); they apply to ``method="atp*"`` only.
    - ``method="noise"``: ROME causal tracing. ``corrupted`` is not used: the corrupted run is
      ``clean`` with Gaussian noise (``noise`` x the std of the subject's token embeddings, or
      ``noise_std``) on the ``subject`` tokens, ``samples`` copies drawn with ``seed``; each cell
      restores the clean state (of ``window`` layers around it).
    - ``method="path"``: path patching from every head to ``receivers`` (``"logits"``, or
      (layer, head) pairs whose ``receiver_input`` ``q``/``k``/``v`` is patched); see
      :func:`ii.path_patch`.

    Sites inside attention, per head: ``head_q``, ``head_k``, ``head_v``, ``head_pattern``
    and their ``_pos`` forms (see ``sweep/heads.py``): activation patching, and for q/k/v
    also ``attribution`` (the plain linear term) and ``atp*``.

    Latent sites: the latents of a dictionary spliced with ``ii.attach`` (``site="sae"``, or
    ``"sae:transformer.h[2]"`` to say which splice): a grid ``values[latent, pos]`` over
    ``latents`` (default: all) x ``positions``, methods ``activation`` (exact, the error
    term kept), ``attribution``, ``atp*`` and ``noise`` (see ``sweep/latents.py``).

    Custom sites: ``dictionary=`` (``ii.Direction(v)``, ``ii.Subspace(basis)``,
    ``ii.Neurons(...)``, ``ii.Custom(encode, decode)``) on ``resid_*``/``attn_out``/``mlp_out``:
    each (layer, position) cell interchanges the dictionary's coordinates (``latents``: all,
    or those chosen) of the base run with the source run's, the rest of the activation kept
    (``sweep/custom.py``); methods ``activation`` and ``attribution``. A list
    of sites (or ``"resid_pre,attn_out,mlp_out"``) gives a dict of results, one per site;
    every name is checked before the first sweep runs.

    ``metric`` maps logits to one number per prompt: ``ii.logit_diff(correct, wrong)``,
    ``ii.prob(token)``, ``ii.logprob(token)`` or any callable. ``batch_size`` caps the number
    of grid cells run together (default: as many as fit in ``memory_fraction`` of free memory).
    Results are float32 whatever the model's dtype (see :class:`SweepResult`).
    ``cluster=ii.RayCluster(...)`` (or ``True``: a local Ray, 2 actors) runs the chunks of
    cells on Ray actors, bit-identical to the local sweep with the same ``batch_size``
    (methods ``activation`` and ``noise``, module sites; see ``sweep/cluster.py``).

    >>> r = patch_sweep(model, clean, corrupted, ii.logit_diff("Mary", "John"))  # doctest: +SKIP
    >>> r.values[layer, pos]       # doctest: +SKIP
    1.0 where the patch restores the clean answer, 0.0 where it has no effect
    """
    start = time.perf_counter()
    choices.check_choice("method", method, METHODS)
    choices.check_choice("direction", direction, DIRECTIONS)
    sites = choices.site_names(site, model)
    cluster = clusters.as_cluster(cluster, method, sites)
    if len(sites) > 1 or not isinstance(site, str):
        choices.check_sites(model, sites, method, adapter)
        same = dict(method=method, direction=direction, layers=layers, positions=positions,
                    heads=heads, batch_size=batch_size, memory_fraction=memory_fraction,
                    subject=subject, samples=samples, noise=noise, noise_std=noise_std,
                    seed=seed, window=window, adapter=adapter, receivers=receivers,
                    receiver_input=receiver_input, cluster=cluster, latents=latents,
                    qk_fix=qk_fix, grad_drop=grad_drop, dictionary=dictionary)
        return {s: patch_sweep(model, clean, corrupted, metric, site=s, **same) for s in sites}
    site = sites[0]
    atp = choices.atp_options(method, qk_fix, grad_drop)
    found = None if site in SITES or site in HEAD_SITES else latent_sites.find_splice(model, site)
    if found is not None:
        given = [k for k, v in (("layers", layers), ("heads", heads), ("cluster", cluster),
                                ("dictionary", dictionary)) if v is not None] + (
            ["window"] if window != 1 else [])
        if given:
            raise InputError(f"latent site {site!r}: {', '.join(given)} do not apply (its grid "
                             "is latents x positions: latents=, positions=)")
        return _latent_sweep(model, clean, corrupted, metric, found, method, direction, latents,
                             positions, batch_size, memory_fraction, atp, start,
                             (subject, samples, noise, noise_std, seed))
    if dictionary is not None:
        custom.check(dictionary, site, method)
    elif latents is not None:
        raise InputError(f"latents= selects the latents of a latent site (an ii.attach "
                         f"splice); site {site!r} has none")
    if method == "atp*":
        return atp_star.sweep(model, clean, corrupted, metric, site=site, layers=layers,
                              positions=positions, heads=heads, direction=direction,
                              batch_size=batch_size, **atp)
    if method == "path":
        return path_patch(model, clean, corrupted, metric, receivers=receivers,
                          receiver_input=receiver_input, positions=positions,
                          batch_size=batch_size or 16)
    if site in HEAD_SITES:
        if method == "attribution" and site in atp_star.HEAD_INPUT_SITES:
            return _head_attribution(model, clean, corrupted, metric, site, layers, positions,
                                     heads, direction)
        if method != "activation":
            raise choices.head_site_error(site, method)
        return head_sweep(model, clean, corrupted, metric, site=site, direction=direction,
                          layers=layers, positions=positions, heads=heads,
                          batch_size=batch_size or 16)
    model = wrap(model)
    warn_if_training(model)
    adapter = adapter_for(model, adapter)
    kind = site_kind(site)
    adapter.module(model.module, site, 0)  # a clear error for sites the architecture lacks
    with torch.no_grad():
        run = prepare(model, adapter, clean, corrupted, metric, method, direction, subject,
                       samples, noise, noise_std, seed)
    if dictionary is not None:
        run.interchange = custom.interchange(dictionary, latents)
    grid = Grid(kind, index_list(layers, adapter.n_layers, "layer"),
                index_list(positions, run.length, "position"),
                index_list(heads, adapter.n_heads, "head"), choices.check_window(window, method),
                adapter.n_layers)
    patcher = Patcher(model, adapter, grid, run, memory_fraction)
    if method == "attribution":
        raw_rows = attribution.sweep(model, adapter, grid, run)
    elif cluster is not None:
        raw_rows = clusters.run(cluster, patcher.engine(batch_size), run, grid.cells(),
                                desc=f"{site} sweep")
    else:
        raw_rows = patcher.engine(batch_size).run(grid.cells(), desc=f"{site} sweep")
    result = _result(model, grid, run, raw_rows, site, method, direction,
                     time.perf_counter() - start)
    result.patcher = patcher
    if dictionary is not None:
        result.extra.update(custom.describe(dictionary, latents))
    return result


class Patcher(CellPatcher):
    """The exact patched run of one grid cell, on demand (the sweep view's detail panel).

    >>> result.patcher.top_tokens((1, 10), k=3)        # doctest: +SKIP
    [('Mary', 0.93), ('John', 0.05), ('them', 0.01)]
    """

    def __init__(self, model: Model, adapter: Adapter, grid: Grid, run: Run,
                 memory_fraction: float) -> None:
        self.model, self.adapter, self.grid, self.run = model, adapter, grid, run
        self.memory_fraction = memory_fraction
        self._engine: Engine | None = None
        self._cells = grid.cells()

    def engine(self, batch_size: int | None = None) -> Engine:
        if self._engine is None:
            self._engine = _engine(self.model, self.adapter, self.grid, self.run,
                                   batch_size, self.memory_fraction)
        return self._engine


def _engine(model: Model, adapter: Adapter, grid: Grid, run: Run, batch_size: int | None,
            memory_fraction: float) -> Engine:
    """The recorded source and base runs, ready to patch (sets the run's baselines). The
    clean one is recorded first: it finds the positions the metric reads (``Run.settle``)."""
    with torch.no_grad():
        recorded: dict[str, Any] = {}
        for name in ("base", "source") if run.base_is_clean else ("source", "base"):
            recorded[name] = record(
                model, adapter, getattr(run, f"{name}_kwargs"), kind=grid.kind,
                layers=grid.patched_layers(), positions=run.positions, stream=name == "base",
                noise=run.noise if name == "base" else None)
            run.settle(model, recorded[name])
        base, source = recorded["base"], recorded["source"]
        if run.interchange is not None:
            custom.replace_sources(base, source, run.interchange)
        engine = Engine(model, adapter, grid.kind, run.base_kwargs, base, source, run.bound(model),
                        run.positions, memory.budget(model.device, memory_fraction),
                        run.n_prompts, cells_per_chunk=batch_size)
        if math.isnan(run.baselines[0]):
            run.set_baselines(float(engine.metric(base.logits).mean()),
                              float(engine.metric(source.logits).mean()))
        return engine


def _result(model: Model, grid: Grid, run: Run, rows: torch.Tensor, site: str, method: str,
            direction: str, seconds: float) -> SweepResult:
    per_prompt = rows.view(rows.shape[0], -1, run.n_prompts).mean(1).float().cpu()
    raw = per_prompt.mean(-1)
    clean, corrupted = run.baselines
    values = normalised(raw, clean, corrupted)
    shape = grid.shape
    return SweepResult(
        values=values.view(shape), raw=raw.view(shape),
        prompt_values=per_prompt.view(*shape, run.n_prompts), clean=clean, corrupted=corrupted,
        dims=grid.dims, layers=grid.layers, positions=grid.positions, heads=grid.heads,
        tokens=run.labels, site=site, method=method,
        direction="causal tracing" if method == "noise" else direction,
        metric=repr(run.metric), seconds=seconds,
        extra={**({"window": grid.window} if method == "noise" else {}),
               "metric_positions": run.reads.describe(), **run.metric.no_per_prompt()})


def _latent_sweep(model: Any, clean: Any, corrupted: Any, metric: Any, found: tuple,
                  method: str, direction: str, latents: Any, positions: Any,
                  batch_size: int | None, memory_fraction: float, atp: dict[str, bool],
                  start: float, noise_args: tuple) -> SweepResult:
    """A sweep over the latents of a splice (``sweep/latents.py``)."""
    site, splice = found
    latent_sites.check_method(site, method)
    model = wrap(model)
    warn_if_training(model)
    adapter = adapter_for(model)
    if method == "atp*":
        result = latent_atp.sweep(model, adapter, clean, corrupted, metric, site, splice,
                                  latents=latents, positions=positions, direction=direction,
                                  grad_drop=atp["grad_drop"])
    else:
        with torch.no_grad():
            run = prepare(model, adapter, clean, corrupted, metric, method, direction,
                          *noise_args)
        result = latent_sites.sweep(model, adapter, run, site, splice, method=method,
                                    latents=latents, positions=positions,
                                    batch_size=batch_size, memory_fraction=memory_fraction,
                                    direction=direction)
    result.seconds = time.perf_counter() - start
    return result


def _head_attribution(model: Any, clean: Any, corrupted: Any, metric: Any, site: str,
                      layers: Any, positions: Any, heads: Any, direction: str) -> SweepResult:
    """Plain attribution patching on a head's q/k/v: ``(source - base) . d metric / d x``
    (AtP*'s terms with the QK fix and GradDrop off)."""
    result = atp_star.sweep(model, clean, corrupted, metric, site=site, layers=layers,
                            positions=positions, heads=heads, direction=direction,
                            grad_drop=False, qk_fix=False)
    result.method = "attribution"
    return result
