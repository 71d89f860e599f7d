"""AtP* over the latents of a splice: attribution patching with GradDrop (there is no
attention softmax between a latent and its own output, so no QK fix applies).

For a latent in block ``m`` of ``L``: ``I = (source - base) * d metric / d latent`` at the
base run, and ``I_l`` the same with layer ``l``'s residual contribution cut from the
gradient (``sweep/atp_runs.py``'s gates): ``I_l = I`` for ``l < m``, ``I_m = 0`` (the
gradient skips block ``m``, splice included), one backward per later layer. With
``grad_drop=True`` a cell's value is AtP*'s magnitude ``mean over prompts of
sum_l |I_l| / (L - 1)``, on the side of the unpatched run that moves towards the other run;
the signed estimate (plain attribution) is kept in ``result.extra["signed_values"]``.

>>> r = sweep(model, adapter, clean, corrupt, metric, "sae:transformer.h[2]", splice,
...           latents=None, positions=[-1], direction="denoising", grad_drop=True)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from ipy_intervene.analysis.inputs import token_labels
from ipy_intervene.arch.sites import MODULE_SITES, Adapter
from ipy_intervene.errors import SiteError
from ipy_intervene.features.splice import Splice
from ipy_intervene.infra.hooks import site_hooks
from ipy_intervene.sweep.atp_runs import Wanted, base_run
from ipy_intervene.sweep.atp_star import _grad_drop, estimate_inputs
from ipy_intervene.sweep.latents import make_grid, splice_layer
from ipy_intervene.sweep.record import record
from ipy_intervene.sweep.result import SweepResult, normalised


def sweep(model: Any, adapter: Adapter, clean: Any, corrupted: Any, metric: Any, site: str,
          splice: Splice, *, latents: Any, positions: Any, direction: str,
          grad_drop: bool) -> SweepResult:
    """AtP* estimates ``values[latent, pos]`` of a latent site (see the module docstring)."""
    layer = splice_layer(model, adapter, splice, site)
    a, base_batch, source_batch, metric, bound, logit_positions = estimate_inputs(
        model, clean, corrupted, metric, direction)
    seen: dict[str, torch.Tensor] = {}
    keep = [(splice.latents, "module_out", lambda x: seen.__setitem__("latents", x))]
    with torch.no_grad(), site_hooks(keep):
        rec = record(model, adapter, source_batch.kwargs, kind=MODULE_SITES["resid_pre"], layers=[],
                     positions=logit_positions)
        source_scores = bound(rec.logits).float()
    source = seen.pop("latents", None)
    with site_hooks(keep):
        base = base_run(model, adapter, base_batch.kwargs, Wanted([]), logit_positions, bound,
                        metric)
    lat = seen.pop("latents", None)
    if source is None or lat is None:
        raise SiteError(f"latent site {site!r}: the forward never reached its splice at "
                        f"model.{splice.target_path}")
    if not lat.requires_grad:
        raise SiteError(f"latent site {site!r}: the latents have no gradient (the "
                        "dictionary's encode cut them from the graph)")
    grid = make_grid(latents, positions, lat.shape[-1], a.length)
    passes = [None, *range(layer + 1, adapter.n_layers)] if grad_drop else [None]
    delta = source.to(lat.dtype) - lat.detach()
    estimates = torch.stack([_cells(delta * base.backward([lat], dropped)[0], grid)
                             for dropped in passes])                   # [passes, cells, B]
    signed = estimates[0]
    rows = base.scores[None] + signed
    if grad_drop:
        side = 1.0 if direction == "denoising" else -1.0
        span = float(source_scores.mean() - base.scores.mean()) * side
        magnitude = _grad_drop(estimates, layer, adapter.n_layers)
        rows = base.scores[None] + side * (1.0 if span >= 0 else -1.0) * magnitude
    baselines = (float(source_scores.mean()), float(base.scores.mean()))
    if direction == "noising":
        baselines = baselines[::-1]
    per_prompt = rows.float().cpu()
    raw = per_prompt.mean(-1)
    shape = grid.shape
    signed_raw = (base.scores[None] + signed).float().cpu().mean(-1)
    return SweepResult(
        values=normalised(raw, *baselines).view(shape), raw=raw.view(shape),
        prompt_values=per_prompt.view(*shape, a.size), clean=baselines[0],
        corrupted=baselines[1], dims=grid.dims, layers=[layer], positions=grid.positions,
        heads=[], tokens=token_labels(model, a), site=site, method="atp*",
        direction=direction, metric=repr(metric), seconds=0.0, latents=grid.latents,
        extra={"qk_fix": False, "grad_drop": grad_drop,
               "estimate": "magnitude" if grad_drop else "signed",
               "cost": {"forwards": 2, "backwards": base.backwards, "attention_calls": 0},
               "signed_values": normalised(signed_raw, *baselines, warn=False).view(shape),
               **metric.no_per_prompt()})


def _cells(term: torch.Tensor, grid: Any) -> torch.Tensor:
    """``[B, P, m]`` -> ``[cells, B]`` in the grid's order (latent-major)."""
    picked = term[:, grid.positions][:, :, grid.latents]
    return picked.permute(2, 1, 0).reshape(-1, picked.shape[0]).float()
