"""Screen, then verify: an approximation over the whole grid (AtP* or attribution patching),
exact activation patching of its ``top`` cells only, both shown, and (``check=True``) how
many of the true top cells the screen caught, from the exact full grid.

>>> s = screen_and_verify(model, clean, corrupt, ii.logit_diff("Mary", "John"),
...                       site="head_out", top=5, check=True)          # doctest: +SKIP
>>> s.cells[0]                                                         # doctest: +SKIP
{'layer': 1, 'head': 3, 'screen': 0.31, 'exact': 0.35}
>>> s.caught                                                           # doctest: +SKIP
5
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ipy_intervene.errors import InputError
from ipy_intervene.sweep.api import patch_sweep
from ipy_intervene.sweep.result import SweepResult, where

METHODS = ("atp*", "attribution")


@dataclass
class ScreenResult:
    """The screen over the whole grid, the exact values of its ``top`` cells and, with
    ``check=True``, the exact full grid and how many of its top cells the screen caught.

    ``cells``: one dict per verified cell, in screen order (layer, pos, head as the site
    has them; ``screen`` and ``exact`` values, normalised: clean = 1, corrupted = 0).
    ``exact_values``: the grid's shape, NaN except at the verified cells.
    """

    screen: SweepResult
    cells: list[dict[str, Any]]
    exact_values: torch.Tensor
    top: int
    exact: SweepResult | None = None
    caught: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def exact_top(self) -> list[tuple[int, ...]] | None:
        """Grid indices of the exact grid's ``top`` cells (``check=True`` only)."""
        return None if self.exact is None else _top_indices(self.exact, self.top)

    def __repr__(self) -> str:
        caught = "" if self.caught is None else f"; caught {self.caught}/{self.top} of the " \
                                                "exact top"
        best = ", ".join(f"{where(c)}: {c['screen']:.3g} -> {c['exact']:.3g}"
                         for c in self.cells[:3])
        return (f"ScreenResult({self.screen.method} screen of {self.screen.site}, "
                f"{self.screen.values.numel()} cells, {len(self.cells)} verified exactly"
                f"{caught}; {best}; {sum(self.seconds.values()):.2f} s)")

    def table_html(self) -> str:
        """The verified cells: where, the screen's value, the exact value."""
        head = "".join(f"<th>{h}</th>" for h in ("rank", "cell", "screen", "exact"))
        rows = "".join(
            f"<tr><td>{i + 1}</td><td>{html.escape(where(c))}</td>"
            f"<td>{c['screen']:.3f}</td><td>{c['exact']:.3f}</td></tr>"
            for i, c in enumerate(self.cells))
        caught = "" if self.caught is None else \
            f"<p>The screen caught {self.caught} of the exact top {self.top} cells.</p>"
        return (f"<div><p>{html.escape(repr(self))}</p><table>"
                f"<tr>{head}</tr>{rows}</table>{caught}</div>")

    def figure(self) -> Any:
        """The screen's heatmap with the verified cells marked (their exact value in the
        hover)."""
        from ipy_intervene.widgets.heatmap import sweep_heatmap
        from ipy_intervene.widgets.sweep_view import row_labels, shown_rows

        fig = self.screen.figure() if self.screen.dims[0] == "latent" else \
            sweep_heatmap(self.screen)
        if self.screen.dims == ("layer", "pos", "head"):
            return fig                         # one position shown: marks would mislead
        x_labels, y_labels = fig.data[0].x, row_labels(self.screen)
        shown = set(shown_rows(self.screen))   # a latent grid draws its strongest rows
        marks = [(x_labels[c["index"][1]], y_labels[c["index"][0]], c["exact"])
                 for c in self.cells if c["index"][0] in shown]
        fig.add_scatter(x=[m[0] for m in marks], y=[m[1] for m in marks], mode="markers",
                        marker={"symbol": "square-open", "size": 18, "color": "black"},
                        customdata=[m[2] for m in marks], name="verified",
                        hovertemplate="exact %{customdata:.3f}<extra></extra>")
        return fig

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        from ipy_intervene.widgets.heatmap import static_html
        from ipy_intervene.widgets.static import images

        fig = self.figure()
        return {"text/plain": repr(self), "text/html": static_html(fig) + self.table_html(),
                **images(fig)}


def screen_and_verify(model: Any, clean: Any, corrupted: Any, metric: Any, *, site: str,
                      top: int = 10, method: str = "atp*", check: bool = False,
                      layers: Sequence[int] | None = None,
                      positions: Sequence[int] | None = None,
                      heads: Sequence[int] | None = None,
                      latents: Sequence[int] | None = None, direction: str = "denoising",
                      batch_size: int | None = None, **options: Any) -> ScreenResult:
    """Screen the whole grid with ``method`` (``"atp*"``: :func:`ii.sweep.atp_star.sweep`,
    options ``grad_drop``/``qk_fix``; ``"attribution"``: ``ii.patch_sweep``'s), on module,
    head or latent sites (``site="sae"``, ``latents=``: see ``sweep/latents.py``), patch its
    ``top`` cells exactly (``ii.patch_sweep(method="activation")`` restricted to them) and,
    with ``check=True``, sweep the full grid exactly to count how many of its ``top`` cells
    the screen caught.

    >>> screen_and_verify(model, clean, corrupt, metric, site="head_out", top=5)  # doctest: +SKIP
    """
    if method not in METHODS:
        raise InputError(f"method={method!r} is not one of: {', '.join(METHODS)}")
    if not isinstance(top, int) or top < 1:
        raise InputError(f"top={top!r}: the number of cells to verify, >= 1")
    grid = dict(layers=layers, positions=positions, heads=heads, direction=direction,
                **({} if latents is None else {"latents": latents}))
    times: dict[str, float] = {}
    start = time.perf_counter()
    screen = patch_sweep(model, clean, corrupted, metric, site=site, method=method,
                         batch_size=batch_size, **grid, **options)
    times["screen"] = time.perf_counter() - start
    start = time.perf_counter()
    chosen = _top_indices(screen, top)
    exact_values = torch.full_like(screen.values, float("nan"))
    custom = {} if options.get("dictionary") is None else {"dictionary": options["dictionary"]}
    verify = {**custom, **({"latents": latents} if custom and latents is not None else {})}
    for index, value in _verify(model, clean, corrupted, metric, screen, chosen, direction,
                                batch_size, verify).items():
        exact_values[index] = value
    times["verify"] = time.perf_counter() - start
    cells = [{**_labels(screen, index), "index": index, "screen": float(screen.values[index]),
              "exact": float(exact_values[index])} for index in chosen]
    result = ScreenResult(screen, cells, exact_values, top, seconds=times)
    if check:
        start = time.perf_counter()
        result.exact = patch_sweep(model, clean, corrupted, metric, site=site,
                                   method="activation", batch_size=batch_size, **grid, **custom)
        times["check"] = time.perf_counter() - start
        result.caught = len(set(chosen) & set(_top_indices(result.exact, top)))
    return result


def _top_indices(result: SweepResult, k: int) -> list[tuple[int, ...]]:
    """Grid indices of the ``k`` cells farthest from the unpatched value (``top`` order)."""
    flat = (result.values.flatten() - result.unpatched).nan_to_num(0.0).abs()
    order = flat.argsort(descending=True, stable=True)[:k]
    return [tuple(int(i) for i in torch.unravel_index(o, result.values.shape)) for o in order]


def _verify(model: Any, clean: Any, corrupted: Any, metric: Any, screen: SweepResult,
            chosen: list[tuple[int, ...]], direction: str, batch_size: int | None,
            custom: dict[str, Any]) -> dict[tuple[int, ...], float]:
    """Exact values of the chosen cells: one ``patch_sweep`` per layer over the positions
    and heads of that layer's chosen cells, or per (layer, position) where that runs fewer
    cells (each call also records the two runs once)."""
    out: dict[tuple[int, ...], float] = {}
    if screen.dims[0] == "latent":   # one sweep over the chosen latents x positions
        latents = sorted({screen.latents[c[0]] for c in chosen})
        positions = sorted({screen.positions[c[1]] for c in chosen})
        exact = patch_sweep(model, clean, corrupted, metric, site=screen.site,
                            method="activation", direction=direction, batch_size=batch_size,
                            latents=latents, positions=positions)
        return {c: float(exact.values[exact.latents.index(screen.latents[c[0]]),
                                      exact.positions.index(screen.positions[c[1]])])
                for c in chosen}
    for layer_i in sorted({c[0] for c in chosen}):
        mine = [c for c in chosen if c[0] == layer_i]
        for group in _groups(screen.dims, mine):
            sub = _subgrid(screen, group)
            exact = patch_sweep(model, clean, corrupted, metric, site=screen.site,
                                method="activation", direction=direction,
                                batch_size=batch_size, **sub, **custom)
            for cell in group:
                out[cell] = float(exact.values[_local(screen, exact, cell)])
    return out


def _groups(dims: tuple[str, ...], cells: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
    if dims != ("layer", "pos", "head"):
        return [cells]
    by_pos: dict[int, list] = {}
    for c in cells:
        by_pos.setdefault(c[1], []).append(c)
    together = len(by_pos) * len({c[2] for c in cells})
    separate = len(cells) + 2 * (len(by_pos) - 1)   # two recording forwards per extra call
    return list(by_pos.values()) if separate < together else [cells]


def _subgrid(screen: SweepResult, group: list[tuple[int, ...]]) -> dict[str, list[int]]:
    sub: dict[str, list[int]] = {"layers": [screen.layers[group[0][0]]]}
    for axis, dim in enumerate(screen.dims[1:], start=1):
        picked = sorted({c[axis] for c in group})
        if dim == "pos":
            sub["positions"] = [screen.positions[i] for i in picked]
        else:
            sub["heads"] = [screen.heads[i] for i in picked]
    return sub


def _local(screen: SweepResult, exact: SweepResult, cell: tuple[int, ...]) -> tuple[int, ...]:
    """The index in the sub-grid result of a screen grid cell."""
    out = [0]
    for axis, dim in enumerate(screen.dims[1:], start=1):
        if dim == "pos":
            out.append(exact.positions.index(screen.positions[cell[axis]]))
        else:
            out.append(exact.heads.index(screen.heads[cell[axis]]))
    return tuple(out)


def _labels(result: SweepResult, index: tuple[int, ...]) -> dict[str, Any]:
    cell = result._cell_at(index)
    cell.pop("value")
    return cell
