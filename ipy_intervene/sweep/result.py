"""SweepResult: the grid of effects, its baselines and labels, and a heatmap.

>>> result.values.shape                       # doctest: +SKIP
torch.Size([4, 15])                            # [layer, pos], clean = 1, corrupted = 0
>>> result.top(3)                              # doctest: +SKIP
[{'layer': 1, 'pos': 10, 'token': 'John (10)', 'value': 0.98}, ...]
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ipy_intervene.errors import InputError


@dataclass
class SweepResult:
    """What a sweep measured. ``values`` is normalised (clean = 1, corrupted = 0); ``raw`` is
    the metric itself (mean over prompts, and over noise samples for causal tracing);
    ``per_prompt`` is ``raw`` before the mean over prompts.

    ``values``, ``raw`` and ``per_prompt`` are float32 CPU tensors whatever the model's dtype:
    the built-in metrics read bfloat16/float16 logits in float32, and a callable metric runs
    in the model's dtype and its numbers are then stored in float32 (``clean`` and
    ``corrupted`` are Python floats).
    """

    values: torch.Tensor
    raw: torch.Tensor
    prompt_values: torch.Tensor       # raw, with a last dimension over prompts (per_prompt)
    clean: float
    corrupted: float
    dims: tuple[str, ...]             # ("layer", "pos"), ("layer", "head"), all three, or
                                      # ("latent", "pos") for a latent site
    layers: list[int]
    positions: list[int]
    heads: list[int]
    tokens: list[str]                 # a label per position of the batch
    site: str
    method: str
    direction: str
    metric: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    latents: list[int] = field(default_factory=list)   # latent sites: dims ("latent", "pos")
    patcher: Any = field(default=None, repr=False)   # exact patched runs on demand (views)
    _shown_in: Any = field(default=None, init=False, repr=False, compare=False)  # mark_shown

    @property
    def per_prompt(self) -> torch.Tensor:
        """The metric per prompt: ``raw`` with a last dimension over prompts; an error when
        the metric returned one number for the whole batch (it would repeat the mean)."""
        reason = self.extra.get("no_per_prompt")
        if reason:
            raise InputError(reason)
        return self.prompt_values

    @property
    def unpatched(self) -> float:
        """The value of a cell whose patch changes nothing: 0 when patching into the
        corrupted run, 1 when patching into the clean one (noising, path patching)."""
        return 1.0 if self.direction == "noising" else 0.0

    def top(self, k: int = 3) -> list[dict[str, Any]]:
        """The ``k`` cells with the largest effect (farthest from :attr:`unpatched`)."""
        flat = (self.values.flatten() - self.unpatched).nan_to_num(0.0)
        order = flat.abs().argsort(descending=True)[:k]
        return [self._cell(int(i)) for i in order]

    def _cell(self, flat: int) -> dict[str, Any]:
        return self._cell_at(tuple(int(i) for i in
                                   torch.unravel_index(torch.tensor(flat), self.values.shape)))

    def _cell_at(self, index: tuple[int, ...]) -> dict[str, Any]:
        """Layer, position (and token), head and value of the cell at a grid index."""
        cell: dict[str, Any] = {}
        for dim, i in zip(self.dims, index):
            if dim == "layer":
                cell["layer"] = self.layers[i]
            elif dim == "latent":
                cell["latent"] = self.latents[i]
            elif dim == "pos":
                cell["pos"] = self.positions[i]
                cell["token"] = self.tokens[self.positions[i]]
            else:
                cell["head"] = self.heads[i]
        cell["value"] = float(self.values[index])
        return cell

    def __repr__(self) -> str:
        names = {"layer": "layers", "pos": "positions", "head": "heads", "latent": "latents"}
        shape = " x ".join(f"{len(self._axis(d))} {names[d]}" for d in self.dims)
        best = ", ".join(_describe(c) for c in self.top(3))
        return (f"SweepResult({self.method} patching, {self.direction}, site={self.site}, "
                f"{shape}; metric {self.metric}: clean {self.clean:.4g}, corrupted "
                f"{self.corrupted:.4g}; largest: {best}; {self._took()})")

    def _took(self) -> str:
        """The time the sweep took, or that it is an earlier identical sweep's result."""
        if self.extra.get("reused"):
            return f"reused: the same sweep ran earlier in {self.seconds:.2f} s"
        return f"{self.seconds:.2f} s"

    def _axis(self, dim: str) -> list[int]:
        return {"layer": self.layers, "pos": self.positions, "head": self.heads,
                "latent": self.latents}[dim]

    # -- pictures ------------------------------------------------------------------------

    def figure(self, pos: int | None = None) -> Any:
        """A plotly heatmap (layers up, positions or heads across), diverging around 0.

        For ``[layer, pos, head]`` results it shows the heads at position ``pos`` (default:
        the position of the largest effect).
        """
        if self.dims[0] == "latent":  # latents up: the sweep view's figure, as an image
            from ipy_intervene.widgets.sweep_view import SweepView

            return SweepView(self).static_figure()
        from ipy_intervene.widgets.heatmap import sweep_heatmap

        return sweep_heatmap(self, pos)

    def show(self) -> Any:
        """The interactive view: heatmap, layer/position (head) sliders, details."""
        from ipy_intervene.widgets.sweep_view import SweepView

        return SweepView(self)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return self.show()._repr_mimebundle_(include=include, exclude=exclude)

    def _ipython_display_(self) -> None:
        """Show the view (``display(result)``, or ``result`` as a cell's last line), unless
        ``mark_shown`` marked it in the running cell: that mark is used up by this one
        skipped display."""
        if self._shown_in is not None and self._shown_in() is _running_cell():
            self._shown_in = None
            return
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)


def mark_shown(result: SweepResult) -> None:
    """Say that ``result`` was shown (or deliberately not) in the running cell, so the next
    display of it in that cell is skipped: ``%patch_sweep ...`` as a cell's last line returns
    its result to IPython's ``Out[]`` after showing it itself, and is shown once.

    >>> mark_shown(result)                         # doctest: +SKIP
    >>> display(result)         # same cell: shows nothing   # doctest: +SKIP
    """
    cell = _running_cell()
    result._shown_in = None if cell is None else weakref.ref(cell)


def _running_cell() -> Any:
    """The ExecutionResult of the cell IPython is running; None outside a cell."""
    from IPython import get_ipython

    return getattr(getattr(get_ipython(), "displayhook", None), "exec_result", None)


def _describe(cell: dict[str, Any]) -> str:
    return f"{where(cell)}: {cell['value']:.3g}"


def where(cell: dict[str, Any]) -> str:
    """``L1 John (10) H3``: a cell of ``top()`` by its layer (or latent ``#12``), token and
    head."""
    parts = [f"#{cell['latent']}" if "latent" in cell else f"L{cell['layer']}"]
    if "token" in cell:
        parts.append(cell["token"])
    if "head" in cell:
        parts.append(f"H{cell['head']}")
    return " ".join(parts)


def normalised(raw: torch.Tensor, clean: float, corrupted: float, *,
               warn: bool = True) -> torch.Tensor:
    """``(raw - corrupted) / (clean - corrupted)``: clean = 1, corrupted = 0. NaN (with a
    warning, unless ``warn=False``) when the two runs give the same metric.

    >>> normalised(torch.tensor([0.0, 1.0, 2.0]), 2.0, 0.0)
    tensor([0.0000, 0.5000, 1.0000])
    """
    span = clean - corrupted
    if math.isclose(span, 0.0, abs_tol=1e-12):
        if warn:
            warnings.warn("the clean and corrupted runs give the same metric, so effects "
                          "cannot be normalised; `values` is NaN, `raw` holds the metric",
                          stacklevel=4)
        return torch.full_like(raw, float("nan"))
    return (raw - corrupted) / span
