"""``ii.patch_sweep``: the Python API the ``%patch_sweep`` magic is a thin layer over."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from ipy_intervene.analysis.inputs import index_list
from ipy_intervene.arch.sites import MODULE_SITES, Adapter, SiteKind, adapter_for, site_kind
from ipy_intervene.errors import InputError
from ipy_intervene.infra.hooks import entry_point
from ipy_intervene.model.envoys import Model
from ipy_intervene.model.loading import warn_if_training, wrap
from ipy_intervene.sweep import (atp_star, attribution, choices, custom, experts, latent_atp,
                                 memory)
from ipy_intervene.sweep import cluster as clusters
from ipy_intervene.sweep import latents as latent_sites
from ipy_intervene.sweep.heads import HEAD_SITES, head_sweep
from ipy_intervene.sweep.paths import path_patch
from ipy_intervene.sweep.record import record
from ipy_intervene.sweep.result import SweepResult, normalised
from ipy_intervene.sweep.runs import CellPatcher, SweepInputs, prepare
from ipy_intervene.sweep.staircase import Engine, GridCell

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

    def cells(self) -> list[GridCell]:
        positions = self.positions if self.kind.per_position else [None]
        heads = self.heads if self.kind.per_head else [None]
        return [GridCell(self.window_of(layer), pos, head)
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
    options = dict(locals())      # every argument, written once: the spec carries them
    start = time.perf_counter()
    spec = SweepSpec.parse(**options)
    if len(spec.sites) > 1 or not isinstance(site, str):
        choices.check_sites(model, spec.sites, method, adapter)
        return {s: _run(spec.for_site(s), start) for s in spec.sites}
    return _run(spec.for_site(spec.sites[0]), start)


@dataclass
class SweepSpec:
    """What :func:`patch_sweep` was asked, checked once: the arguments by name, the site
    names (``sites``) and, once one site is chosen (:meth:`for_site`), its family
    (``"module"``, ``"head"`` or ``"latent"``) and a latent site's splice."""

    model: Any
    clean: Any
    corrupted: Any
    metric: Any
    site: Any
    method: str
    direction: str
    layers: Sequence[int] | None
    positions: Sequence[int] | None
    heads: Sequence[int] | None
    batch_size: int | None
    memory_fraction: float
    subject: Any
    samples: int
    noise: float
    noise_std: float | None
    seed: int
    window: int
    adapter: Adapter | None
    receivers: Any
    receiver_input: str
    cluster: Any
    latents: Sequence[int] | None
    qk_fix: bool | None
    grad_drop: bool | None
    dictionary: Any
    sites: list[str] = field(default_factory=list)
    family: str = ""
    splice: Any = None
    atp: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def parse(cls, **options: Any) -> "SweepSpec":
        spec = cls(**options)
        choices.check_choice("method", spec.method, METHODS)
        choices.check_choice("direction", spec.direction, DIRECTIONS)
        spec.sites = choices.site_names(spec.site, spec.model)
        spec.cluster = clusters.as_cluster(spec.cluster, spec.method, spec.sites)
        return spec

    def for_site(self, site: str) -> "SweepSpec":
        """The spec of one site, its family found and the options that do not fit it
        refused."""
        spec = replace(self, site=site, sites=[site])
        spec.atp = choices.atp_options(spec.method, spec.qk_fix, spec.grad_drop)
        if site in experts.EXPERT_SITES:
            spec.family = "expert"
            return spec
        found = None if site in MODULE_SITES or site in HEAD_SITES else \
            latent_sites.find_splice(spec.model, site)
        if found is not None:
            spec.family, (spec.site, spec.splice) = "latent", found
            spec._check_latent_options()
            return spec
        spec.family = "head" if site in HEAD_SITES else "module"
        if spec.dictionary is not None:
            custom.check(spec.dictionary, site, spec.method)
        elif spec.latents is not None:
            raise InputError(f"latents= selects the latents of a latent site (an ii.attach "
                             f"splice); site {site!r} has none")
        return spec

    def _check_latent_options(self) -> None:
        given = [k for k in ("layers", "heads", "cluster", "dictionary")
                 if getattr(self, k) is not None] + (["window"] if self.window != 1 else [])
        if given:
            raise InputError(f"latent site {self.site!r}: {', '.join(given)} do not apply (its "
                             "grid is latents x positions: latents=, positions=)")

    @property
    def pair(self) -> tuple[Any, Any, Any, Any]:
        return self.model, self.clean, self.corrupted, self.metric


def _run(spec: SweepSpec, start: float) -> SweepResult:
    """The runner of the spec's (site family, method)."""
    general = spec.family not in ("expert",)      # expert sites have only their own runners
    runner = RUNNERS.get((spec.family, spec.method)) or (
        RUNNERS.get((None, spec.method)) if general else None)
    if runner is None:
        served = sorted(m for f, m in RUNNERS if f == spec.family or general and f is None)
        raise InputError(f"method={spec.method!r} does not apply to site {spec.site!r}; its "
                         f"methods: {', '.join(served)}")
    return runner(spec, start)


def _latents(spec: SweepSpec, start: float) -> SweepResult:
    """A sweep over the latents of a splice (``sweep/latents.py``)."""
    latent_sites.check_method(spec.site, spec.method)
    model = wrap(spec.model)
    warn_if_training(model)
    adapter = adapter_for(model)
    if spec.method == "atp*":
        result = latent_atp.sweep(model, adapter, spec.clean, spec.corrupted, spec.metric,
                                  spec.site, spec.splice, latents=spec.latents,
                                  positions=spec.positions, direction=spec.direction,
                                  grad_drop=spec.atp["grad_drop"])
    else:
        with torch.no_grad():
            run = prepare(model, adapter, spec.clean, spec.corrupted, spec.metric, spec.method,
                          spec.direction, spec.subject, spec.samples, spec.noise,
                          spec.noise_std, spec.seed)
        result = latent_sites.sweep(model, adapter, run, spec.site, spec.splice,
                                    method=spec.method, latents=spec.latents,
                                    positions=spec.positions, batch_size=spec.batch_size,
                                    memory_fraction=spec.memory_fraction,
                                    direction=spec.direction)
    result.seconds = time.perf_counter() - start
    return result


def _atp_star(spec: SweepSpec, start: float) -> SweepResult:
    return atp_star.sweep(*spec.pair, site=spec.site, layers=spec.layers,
                          positions=spec.positions, heads=spec.heads, direction=spec.direction,
                          batch_size=spec.batch_size, **spec.atp)


def _path(spec: SweepSpec, start: float) -> SweepResult:
    return path_patch(*spec.pair, receivers=spec.receivers, receiver_input=spec.receiver_input,
                      positions=spec.positions, batch_size=spec.batch_size or 16)


def _heads(spec: SweepSpec, start: float) -> SweepResult:
    return head_sweep(*spec.pair, site=spec.site, direction=spec.direction, layers=spec.layers,
                      positions=spec.positions, heads=spec.heads,
                      batch_size=spec.batch_size or 16)


def _head_attribution(spec: SweepSpec, start: float) -> SweepResult:
    """Plain attribution patching on a head's q/k/v: ``(source - base) . d metric / d x``
    (AtP*'s terms with the QK fix and GradDrop off)."""
    if spec.site not in atp_star.HEAD_INPUT_SITES:
        raise choices.head_site_error(spec.site, spec.method)
    result = atp_star.sweep(*spec.pair, site=spec.site, layers=spec.layers,
                            positions=spec.positions, heads=spec.heads,
                            direction=spec.direction, grad_drop=False, qk_fix=False)
    result.method = "attribution"
    return result


def _head_noise(spec: SweepSpec, start: float) -> SweepResult:
    raise choices.head_site_error(spec.site, spec.method)


def _grid(spec: SweepSpec, start: float) -> SweepResult:
    """Module sites (``resid_*``, ``attn_out``, ``mlp_out``, ``head_out``): activation
    patching, attribution patching and causal tracing on the batched engine."""
    model = wrap(spec.model)
    warn_if_training(model)
    adapter = adapter_for(model, spec.adapter)
    site, method = spec.site, spec.method
    adapter.module(model.module, site, 0)  # a clear error for sites the architecture lacks
    with torch.no_grad():
        run = prepare(model, adapter, spec.clean, spec.corrupted, spec.metric, method,
                      spec.direction, spec.subject, spec.samples, spec.noise, spec.noise_std,
                      spec.seed)
    if spec.dictionary is not None:
        run.interchange = custom.interchange(spec.dictionary, spec.latents)
    grid = Grid(site_kind(site), index_list(spec.layers, adapter.n_layers, "layer"),
                index_list(spec.positions, run.length, "position"),
                index_list(spec.heads, adapter.n_heads, "head"),
                choices.check_window(spec.window, method), adapter.n_layers)
    patcher = Patcher(model, adapter, grid, run, spec.memory_fraction)
    if method == "attribution":
        raw_rows = attribution.sweep(model, adapter, grid, run)
    elif spec.cluster is not None:
        raw_rows = clusters.run(spec.cluster, patcher.engine(spec.batch_size), run,
                                grid.cells(), desc=f"{site} sweep")
    else:
        raw_rows = patcher.engine(spec.batch_size).run(grid.cells(), desc=f"{site} sweep")
    result = _result(model, grid, run, raw_rows, site, method, spec.direction,
                     time.perf_counter() - start)
    result.patcher = patcher
    if spec.dictionary is not None:
        result.extra.update(custom.describe(spec.dictionary, spec.latents))
    return result


#: (site family, method) -> runner; ``None`` matches any family.
RUNNERS = {
    **{("latent", m): _latents for m in METHODS},
    (None, "atp*"): _atp_star,
    (None, "path"): _path,
    ("head", "activation"): _heads,
    ("head", "attribution"): _head_attribution,
    ("head", "noise"): _head_noise,
    ("expert", "activation"): experts.from_spec,  # site="expert_out"/"expert_out_pos" (MoE)
    **{("module", m): _grid for m in ("activation", "attribution", "noise")},
}


class Patcher(CellPatcher):
    """The exact patched run of one grid cell, on demand (the sweep view's detail panel).

    >>> result.patcher.top_tokens((1, 10), k=3)        # doctest: +SKIP
    [('Mary', 0.93), ('John', 0.05), ('them', 0.01)]
    """

    def __init__(self, model: Model, adapter: Adapter, grid: Grid, run: SweepInputs,
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


def _engine(model: Model, adapter: Adapter, grid: Grid, run: SweepInputs, batch_size: int | None,
            memory_fraction: float) -> Engine:
    """The recorded source and base runs, ready to patch (sets the run's baselines). The
    clean one is recorded first: it finds the positions the metric reads
    (``SweepInputs.settle``)."""
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


def _result(model: Model, grid: Grid, run: SweepInputs, rows: torch.Tensor, site: str, method: str,
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
