"""Sweeps over the latents of a spliced dictionary (an SAE, a transcoder, a direction...).

A latent site is a splice (``ii.attach``): ``site="sae"`` when one splice is named ``sae``,
``site="sae:transformer.h[2]"`` to say which, or its path ``"transformer.h[2].sae"``. A grid
cell is one latent at one position; its exact patched run is the splice's own arithmetic
(``ipy_intervene/features/splice.py``) with that latent of the base run set to the source
run's value: ``decode(lat2) + (x - decode(lat))``, the error term kept.

The engine is the staircase's (:mod:`ipy_intervene.sweep.staircase`): the base run is
recorded once (residual stream, keys/values, latents), and each chunk of cells runs from the
block holding the splice on, on the positions from the patched one on, many cells per
forward, one block of rows each; the unembedding runs where the metric reads. A cell whose
source value equals the base value bit for bit (a latent off in both runs: most of an SAE's)
cannot change anything and takes the base run's logits. A model with edits (``ii.edit``)
runs each chunk as whole forwards instead (:meth:`LatentEngine._patch_hooks`): an edit may
touch several modules, at positions counted from each prompt's start.

>>> splice = ii.attach(model, model.transformer.h[2], ii.load_sae("demo"))   # doctest: +SKIP
>>> r = ii.patch_sweep(model, clean, corrupt, ii.logit_diff("Mary", "John"), site="sae",
...                    positions=[-1])                                       # doctest: +SKIP
>>> r.dims, r.values.shape                                                   # doctest: +SKIP
(('latent', 'pos'), torch.Size([512, 1]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ipy_intervene.analysis.inputs import index_list
from ipy_intervene.arch.sites import MODULE_SITES, Adapter, get_path
from ipy_intervene.errors import InputError, SiteError
from ipy_intervene.features.splice import Splice, attached
from ipy_intervene.infra.hooks import site_hooks
from ipy_intervene.sweep import memory
from ipy_intervene.sweep.attribution import _check_differentiable, _grad_root
from ipy_intervene.sweep.record import Recording, record
from ipy_intervene.sweep.result import SweepResult, normalised
from ipy_intervene.sweep.runs import CellPatcher, SweepInputs
from ipy_intervene.sweep.staircase import Engine, _bits

METHODS = ("activation", "attribution", "atp*", "noise")


def find_splice(model: Any, site: Any) -> tuple[str, Splice] | None:
    """``(canonical site name, splice)`` of a latent site, or None when ``site`` names no
    splice. ``"sae"``: the splice named ``sae`` (an error when several are);
    ``"sae:transformer.h[2]"``: the one at that module; ``"transformer.h[2].sae"``: its path.
    """
    if not isinstance(site, str):
        return None
    splices = attached(model)
    if site in splices:
        return _name(site, splices[site]), splices[site]
    name, _, at = site.partition(":")
    mine = {path: s for path, s in splices.items() if path.rsplit(".", 1)[-1] == name.strip()}
    if at:
        mine = {p: s for p, s in mine.items() if s.target_path == at.strip()}
        if not mine:
            raise SiteError(f"site {site!r}: no splice named {name!r} at model.{at.strip()}; "
                            f"latent sites: {', '.join(site_names(model)) or 'none attached'}")
    if len(mine) > 1:
        raise SiteError(f"site {site!r}: {len(mine)} splices are named {name!r}; say which: "
                        f"{', '.join(_name(p, s) for p, s in mine.items())}")
    if not mine:
        return None
    path, splice = next(iter(mine.items()))
    return _name(path, splice), splice


def site_names(model: Any) -> list[str]:
    """The latent sites of a model's splices (``"sae:transformer.h[2]"``)."""
    try:
        return [_name(p, s) for p, s in attached(model).items()]
    except InputError:
        return []


def _name(path: str, splice: Splice) -> str:
    return f"{path.rsplit('.', 1)[-1]}:{splice.target_path}"


def splice_layer(model: Any, adapter: Adapter, splice: Splice, site: str) -> int:
    """The block holding the splice (its target is that block or inside it)."""
    blocks = get_path(model.module, adapter.blocks)
    for layer, block in enumerate(blocks):
        if any(m is splice for m in block.modules()):
            return layer
    raise SiteError(f"latent site {site!r}: its splice is at model.{splice.target_path}, "
                    f"outside the blocks ({adapter.blocks}); latent sweeps patch splices at a "
                    "block or inside one")


@dataclass(frozen=True)
class LatentCell:
    """One cell: ``latent`` at position ``pos`` (``layers``: unused, for the engine's plan)."""

    pos: int
    latent: int
    layers: tuple[int, ...] = ()


@dataclass
class LatentGrid:
    """Latents down, positions across: cells latent-major, as ``values[latent, pos]``."""

    latents: list[int]
    positions: list[int]
    dims: tuple[str, ...] = ("latent", "pos")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.latents), len(self.positions))

    def cells(self) -> list[LatentCell]:
        return [LatentCell(p, j) for j in self.latents for p in self.positions]


@dataclass
class LatentEngine(Engine):
    """The staircase engine with one edit: a latent of the splice, set in each cell's rows."""

    splice: Any = None
    layer: int = 0
    base_latents: torch.Tensor | None = None      # [rows, P, d_latent]
    source_latents: torch.Tensor | None = None    # [source rows, P, d_latent]
    _equal: torch.Tensor | None = field(default=None, repr=False)

    def joins_at(self, cell: Any) -> int:
        return self.layer

    def untouched(self, cell: Any) -> bool:
        """True when the source value equals the base value in every row, bit for bit."""
        if self._equal is None:
            base = self.base_latents
            source = self._rows(self.source_latents).to(base.device, base.dtype)
            self._equal = (_bits(base) == _bits(source)).all(0).cpu()
        return bool(self._equal[cell.pos, cell.latent])

    def _rows(self, source: torch.Tensor) -> torch.Tensor:
        """The source value of each base row (noise samples repeat the prompts)."""
        prompts = torch.arange(self.rows, device=source.device) % source.shape[0]
        return source[prompts]

    def _bytes_per_row(self, prefix: int) -> int:
        width = self.source_latents.shape[-1]
        latents = 3 * (self.length - prefix) * width * self.source_latents.element_size()
        return super()._bytes_per_row(prefix) + latents

    def _staircase(self, prefix: int, cells: list[Any]) -> torch.Tensor:
        caller = self._caller(prefix)
        hidden = self.base.stream[self.layer][:, prefix:].repeat(len(cells), 1, 1)
        with site_hooks([(self.splice.latents, "module_out", self._edit_latents(cells, prefix))]):
            hidden = caller(self.layer, hidden)
        for layer in range(self.layer + 1, self.adapter.n_layers):
            hidden = caller(layer, hidden)
        return self._logits(hidden, prefix, len(cells))

    def _patch_hooks(self, cells: list[Any]) -> list[tuple[Any, str, Any]]:
        """A whole forward's patch (a model with edits, :meth:`Engine.whole_forwards`): the
        cells' latents set at the splice, after the edits' own hooks there."""
        return [(self.splice.latents, "module_out", self._edit_latents(cells, 0))]

    def _edit_latents(self, cells: list[Any], prefix: int):
        source = self._rows(self.source_latents)
        rows = torch.cat([torch.arange(self.rows) + slot * self.rows
                          for slot in range(len(cells))])
        pos = torch.tensor([c.pos - prefix for c in cells]).repeat_interleave(self.rows)
        latent = torch.tensor([c.latent for c in cells]).repeat_interleave(self.rows)
        values = torch.cat([source[:, c.pos, c.latent] for c in cells])

        def edit(x: torch.Tensor) -> torch.Tensor:
            out = x.clone()
            device = x.device
            out[rows.to(device), pos.to(device), latent.to(device)] = values.to(device, x.dtype)
            return out

        return edit


def _record(model: Any, adapter: Adapter, run: SweepInputs, name: str, splice: Splice, site: str,
            grad: bool = False) -> tuple[Recording, torch.Tensor]:
    """One recorded run and the splice's latents in it (with autograd for attribution's
    base run); the first recorded, the clean one, finds the metric's positions."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [(splice.latents, "module_out", lambda x: seen.__setitem__("latents", x))]
    if grad:
        hooks.insert(0, _grad_root(model, adapter))
    base = name == "base"
    with torch.set_grad_enabled(grad), site_hooks(hooks):
        rec = record(model, adapter, getattr(run, f"{name}_kwargs"), kind=MODULE_SITES["resid_pre"],
                     layers=[], positions=run.positions, stream=base and not grad,
                     noise=run.noise if base else None)
        run.settle(model, rec)
    if "latents" not in seen:
        raise SiteError(f"latent site {site!r}: the forward never reached its splice at "
                        f"model.{splice.target_path}")
    return rec, seen["latents"]


def _recorded(model: Any, adapter: Adapter, run: SweepInputs, splice: Splice, site: str,
              grad: bool = False) -> dict[str, tuple[Recording, torch.Tensor]]:
    out = {}
    for name in ("base", "source") if run.base_is_clean else ("source", "base"):
        out[name] = _record(model, adapter, run, name, splice, site, grad and name == "base")
    return out


def make_grid(latents: Sequence[int] | int | None, positions: Sequence[int] | int | None,
              width: int, length: int) -> LatentGrid:
    return LatentGrid(index_list(latents, width, "latent"),
                      index_list(positions, length, "position"))


def engine(model: Any, adapter: Adapter, run: SweepInputs, splice: Splice, site: str,
           batch_size: int | None, memory_fraction: float) -> LatentEngine:
    """The recorded runs, ready to patch latents (sets the run's baselines)."""
    layer = splice_layer(model, adapter, splice, site)
    with torch.no_grad():
        recorded = _recorded(model, adapter, run, splice, site)
    (base, base_latents), (source, source_latents) = recorded["base"], recorded["source"]
    out = LatentEngine(model, adapter, MODULE_SITES["resid_pre"], run.base_kwargs, base, source,
                       run.bound(model), run.positions,
                       memory.budget(model.device, memory_fraction), run.n_prompts,
                       cells_per_chunk=batch_size, splice=splice, layer=layer,
                       base_latents=base_latents, source_latents=source_latents)
    with torch.no_grad():
        run.set_baselines(float(out.metric(base.logits).mean()),
                          float(out.metric(source.logits).mean()))
    return out


def attribution_rows(model: Any, adapter: Adapter, run: SweepInputs, splice: Splice, site: str,
                     latents: Any, positions: Any) -> tuple[LatentGrid, torch.Tensor]:
    """``(grid, [cells, prompts])``: the base metric plus ``(source - base) * d metric /
    d latents`` at the base run, the gradient reaching the latents through the decoder (the
    splice detaches its error term under autograd)."""
    splice_layer(model, adapter, splice, site)
    recorded = _recorded(model, adapter, run, splice, site, grad=True)
    (base, base_latents), (source, source_latents) = recorded["base"], recorded["source"]
    metric = run.bound(model)
    with torch.enable_grad():
        scores = metric(base.logits)
        _check_differentiable(scores, run.metric)
        if not base_latents.requires_grad:
            raise SiteError(f"latent site {site!r}: the latents have no gradient (the "
                            "dictionary's encode cut them from the graph)")
        (grad,) = torch.autograd.grad(scores.sum(), [base_latents])
    scores = scores.detach()
    with torch.no_grad():
        run.set_baselines(float(scores.mean()), float(metric(source.logits).mean()))
    grid = make_grid(latents, positions, base_latents.shape[-1], run.length)
    effect = (source_latents.to(grad.dtype) - base_latents.detach()) * grad   # [B, P, m]
    effect = effect[:, grid.positions][:, :, grid.latents]                     # [B, p, j]
    rows = effect.permute(2, 1, 0).reshape(-1, effect.shape[0])                # latent-major
    return grid, scores[None] + rows.float()


class LatentPatcher(CellPatcher):
    """The exact patched run of one latent cell, on demand (the sweep view's detail panel).

    >>> result.patcher.top_tokens((3, 0), k=3)       # doctest: +SKIP
    """

    def __init__(self, model: Any, engine: LatentEngine, grid: LatentGrid,
                 run: SweepInputs) -> None:
        self.model, self._engine, self.grid, self.run = model, engine, grid, run
        self._cells = grid.cells()

    def engine(self, batch_size: int | None = None) -> LatentEngine:
        return self._engine


def check_method(site: str, method: str) -> None:
    if method not in METHODS:
        raise InputError(f"latent site {site!r} is swept with method {', '.join(METHODS)}; "
                         f"got {method!r}")


def sweep(model: Any, adapter: Adapter, run: SweepInputs, site: str, splice: Splice, *, method: str,
          latents: Any, positions: Any, batch_size: int | None, memory_fraction: float,
          direction: str) -> SweepResult:
    """Every (latent, position) cell of a latent site: exact (``activation``, ``noise``)
    or the linear estimate (``attribution``); ``values[latent, pos]``."""
    check_method(site, method)
    if method == "attribution":
        grid, rows = attribution_rows(model, adapter, run, splice, site, latents, positions)
        patcher = None
    else:
        eng = engine(model, adapter, run, splice, site, batch_size, memory_fraction)
        grid = make_grid(latents, positions, eng.source_latents.shape[-1], run.length)
        rows = eng.run(grid.cells(), desc=f"{site} sweep")
        patcher = LatentPatcher(model, eng, grid, run)
    result = latent_result(grid, run, rows, site, method, direction,
                           splice_layer(model, adapter, splice, site))
    result.patcher = patcher
    return result


def latent_result(grid: LatentGrid, run: SweepInputs, rows: torch.Tensor, site: str, method: str,
                  direction: str, layer: int) -> SweepResult:
    """The result of ``rows [cells, rows]`` (cells latent-major)."""
    per_prompt = rows.view(rows.shape[0], -1, run.n_prompts).mean(1).float().cpu()
    raw = per_prompt.mean(-1)
    clean, corrupted = run.baselines
    shape = grid.shape
    return SweepResult(
        values=normalised(raw, clean, corrupted).view(shape), raw=raw.view(shape),
        prompt_values=per_prompt.view(*shape, run.n_prompts), clean=clean, corrupted=corrupted,
        dims=grid.dims, layers=[layer], positions=grid.positions, heads=[], tokens=run.labels,
        site=site, method=method, direction="causal tracing" if method == "noise" else direction,
        metric=repr(run.metric), seconds=0.0, latents=grid.latents,
        extra={"metric_positions": run.reads.describe(), **run.metric.no_per_prompt()})
