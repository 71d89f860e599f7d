"""Activation patching of the sites inside attention, per head: each head's queries, keys,
values or pattern (at every position, or at one query position), patched from the source
run into the base run, one forward per chunk of cells (every row of a forward is one
(cell, prompt) pair). Exact: each cell equals a patched forward of its own.

Sites: ``head_q``, ``head_k``, ``head_v``, ``head_pattern`` (a head at every position) and
``head_q_pos``, ``head_k_pos``, ``head_v_pos``, ``head_pattern_pos`` (one position; for the
pattern, one query row). Keys and values are per kv head under grouped-query attention.

>>> r = head_sweep(model, clean, corrupt, metric, site="head_pattern")  # doctest: +SKIP
>>> r.values.shape                                                          # doctest: +SKIP
torch.Size([4, 4])                                     # [layer, head]; clean = 1, corrupted = 0
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ipy_intervene.analysis.inputs import prepare_pair, token_labels
from ipy_intervene.analysis.metrics import as_metric
from ipy_intervene.analysis.reads import OnLogits
from ipy_intervene.arch import attention
from ipy_intervene.arch.attention import site_point
from ipy_intervene.arch.sites import Adapter, adapter_for
from ipy_intervene.errors import InputError
from ipy_intervene.infra.hooks import HookSession, entry_point, tap
from ipy_intervene.infra.progress import progress_disabled
from ipy_intervene.model.loading import warn_if_training, wrap
from ipy_intervene.sweep.result import SweepResult, normalised

HEAD_SITES = {f"head_{name}{pos}": (name, bool(pos)) for name in ("q", "k", "v", "pattern")
         for pos in ("", "_pos")}
HeadCell = tuple[int, int, int | None]   # layer, head, position (None: every position)


@entry_point
@torch.no_grad()
def head_sweep(model: Any, clean: Any, corrupted: Any, metric: Any, *, site: str,
               direction: str = "denoising", layers: Sequence[int] | None = None,
               positions: Sequence[int] | None = None, heads: Sequence[int] | None = None,
               batch_size: int = 16) -> SweepResult:
    """Patch each head's ``site`` (see the module's docstring) from one run into the other:
    ``denoising`` (default) puts clean values into the corrupted run.

    >>> head_sweep(model, clean, corrupt, metric, site="head_v")  # doctest: +SKIP
    """
    start = time.perf_counter()
    if site not in HEAD_SITES:
        raise InputError(f"unknown attention site {site!r}; sites: {', '.join(HEAD_SITES)}")
    name, per_position = HEAD_SITES[site]
    model = wrap(model)
    warn_if_training(model)
    adapter = adapter_for(model)
    a, b = prepare_pair(model, clean, corrupted)
    metric = as_metric(metric)
    bound = OnLogits(model, metric, a.size, a.length)
    runs = {}
    for which, batch in (("clean", a), ("corrupted", b)):  # clean first: it finds the reads
        runs[which] = _record(model.module, adapter, name, {**batch.kwargs, **bound.keep})
        bound.settle(runs[which][1])
    (recorded, _), base = (runs["clean"], b) if direction == "denoising" else (
        runs["corrupted"], a)
    n_heads = recorded[0].shape[1]
    grid = _grid(adapter, n_heads, a.length, per_position, layers, positions, heads)
    run = _Patches(model.module, adapter, name, {**base.kwargs, **bound.keep}, a.size,
                   recorded, bound)
    per_prompt = in_chunks(run.chunk, grid.cells, batch_size, f"{site} sweep").reshape(
        *grid.shape, a.size)
    hi, lo = (float(bound(runs[which][1]).mean()) for which in ("clean", "corrupted"))
    raw = per_prompt.mean(-1)
    return SweepResult(
        normalised(raw, hi, lo), raw, per_prompt, hi, lo, grid.dims, grid.layers,
        grid.positions, grid.heads, token_labels(model, a), site, "activation", direction,
        repr(metric), time.perf_counter() - start,
        extra={"metric_positions": bound.reads.describe(), **metric.no_per_prompt()})


class _Grid:
    def __init__(self, layers: list[int], positions: list[int], heads: list[int],
                 per_position: bool) -> None:
        self.layers, self.positions, self.heads = layers, positions, heads
        if per_position:
            self.dims = ("layer", "pos", "head")
            self.cells: list[HeadCell] = [(l, h, p) for l in layers for p in positions
                                          for h in heads]
            self.shape: tuple[int, ...] = (len(layers), len(positions), len(heads))
        else:
            self.dims, self.positions = ("layer", "head"), []
            self.cells = [(l, h, None) for l in layers for h in heads]
            self.shape = (len(layers), len(heads))


def _grid(adapter: Adapter, n_heads: int, length: int, per_position: bool,
          layers: Sequence[int] | None, positions: Sequence[int] | None,
          heads: Sequence[int] | None) -> _Grid:
    def pick(given: Sequence[int] | None, size: int, what: str) -> list[int]:
        if given is None:
            return list(range(size))
        out = [int(i) % size if -size <= int(i) < size else None for i in given]
        if None in out:
            raise InputError(f"{what} {list(given)} outside 0..{size - 1}")
        return out  # type: ignore[return-value]

    return _Grid(pick(layers, adapter.n_layers, "layers"), pick(positions, length, "positions"),
                 pick(heads, n_heads, "heads"), per_position)


def _record(module: nn.Module, adapter: Adapter, name: str,
            kwargs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's ``name`` and the logits, with the attention the patched runs use."""
    kept: list[Any] = [None] * adapter.n_layers
    with HookSession() as session:
        attention.use_sites(session, module)
        for layer in range(adapter.n_layers):
            tap(session, site_point(module, adapter, layer, name), False,
                lambda x, layer=layer: kept.__setitem__(layer, x.clone()))
        logits = module(**kwargs).logits
    return kept, logits


class _Patches:
    def __init__(self, module: nn.Module, adapter: Adapter, name: str, kwargs: dict, n: int,
                 recorded: list[torch.Tensor], bound: Any) -> None:
        self.module, self.adapter, self.name, self.kwargs, self.n = module, adapter, name, \
            kwargs, n
        self.recorded, self.bound = recorded, bound

    def chunk(self, cells: list[HeadCell]) -> torch.Tensor:
        """The metric of each (cell, prompt) row: ``[len(cells) * n]``."""
        kwargs = {k: v.repeat(len(cells), *[1] * (v.dim() - 1))
                  if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == self.n else v
                  for k, v in self.kwargs.items()}
        with HookSession() as session:
            attention.use_sites(session, self.module)
            for layer in {c[0] for c in cells}:
                rows = [(i, h, p) for i, (l, h, p) in enumerate(cells) if l == layer]
                tap(session, site_point(self.module, self.adapter, layer, self.name), False,
                    self._patch(layer, rows))
            return self.bound(self.module(**kwargs).logits).float()

    def _patch(self, layer: int, rows: list[tuple[int, int, int | None]]):
        source, n = self.recorded[layer], self.n

        def patch(x: torch.Tensor) -> torch.Tensor:
            new = x.clone()
            for i, head, pos in rows:
                where = (slice(i * n, (i + 1) * n), head) if pos is None else \
                    (slice(i * n, (i + 1) * n), head, pos)
                new[where] = source[(slice(None),) + where[1:]].to(new.dtype)
            return new

        return patch


def in_chunks(run: Callable[[list[Any]], torch.Tensor], items: list[Any], batch_size: int,
              desc: str) -> torch.Tensor:
    """``run`` on ``batch_size`` items at a time, concatenated, with a progress bar."""
    out = []
    bar = tqdm(total=len(items), desc=desc, delay=1.0, leave=False, disable=progress_disabled())
    try:
        for i in range(0, len(items), batch_size):
            out.append(run(items[i:i + batch_size]))
            bar.update(len(items[i:i + batch_size]))
    finally:
        bar.close()
    return torch.cat(out).float().cpu()  # results are float32 on the CPU, like the others
