"""Attribution patching: the first-order estimate of every cell's effect at once.

For a cell at activation ``a``: ``effect ~= (a_source - a_base) . d metric / d a_base``, from one
source forward, one base forward with autograd and one backward (weights get no gradient).
"""

from __future__ import annotations

from typing import Any

import torch

from ipy_intervene.arch.sites import Adapter, get_path, split_heads
from ipy_intervene.errors import InputError
from ipy_intervene.infra.hooks import site_hooks
from ipy_intervene.sweep.record import record


def sweep(model: Any, adapter: Adapter, grid: Any, run: Any) -> torch.Tensor:
    """``[n_cells, prompts]``: the metric each prompt is estimated to reach under each patch."""
    layers = grid.patched_layers()
    recorded = {}
    for name in ("base", "source") if run.base_is_clean else ("source", "base"):
        recorded[name] = _record(model, adapter, grid, run, name, layers)
    base, source = recorded["base"], recorded["source"]
    if run.interchange is not None:       # custom sites: x' - x_base (see custom.py)
        for layer in layers:
            source.sites[layer] = run.interchange(base.sites[layer], source.sites[layer])
    metric = run.bound(model)
    with torch.enable_grad():
        scores = metric(base.logits)
        _check_differentiable(scores, run.metric)
        grads = torch.autograd.grad(scores.sum(), [base.sites[l] for l in layers])
    scores = scores.detach()
    run.set_baselines(float(scores.mean()), float(metric(source.logits).mean()))
    effects = {l: _effect(source.sites[l], base.sites[l].detach(), g, grid, adapter.n_heads)
               for l, g in zip(layers, grads)}
    rows = [effects[layer] for layer in grid.layers]
    return scores[None] + torch.cat(rows).float()


def _record(model: Any, adapter: Adapter, grid: Any, run: Any, name: str,
            layers: list[int]) -> Any:
    """The source run (no grad) or the base run (with grad); the first recorded, the clean
    one, finds the positions the metric reads (``run.settle``)."""
    grad = name == "base"
    with torch.set_grad_enabled(grad), site_hooks([_grad_root(model, adapter)] if grad else []):
        recorded = record(model, adapter, getattr(run, f"{name}_kwargs"), kind=grid.kind,
                          layers=layers, positions=run.positions)
        run.settle(model, recorded)
    return recorded


def _effect(source: torch.Tensor, base: torch.Tensor, grad: torch.Tensor, grid: Any,
            n_heads: int) -> torch.Tensor:
    """One layer's cells, in the grid's order, as rows ``[cells, prompts]``."""
    product = (source - base) * grad
    if grid.kind.per_head:
        product = split_heads(product, n_heads)[..., grid.heads, :]
    effect = product.sum(-1)                      # [B, P] or [B, P, H]
    if grid.kind.per_position:
        effect = effect[:, grid.positions]
    else:
        effect = effect.sum(1)                    # head_out: all positions at once
    return effect.reshape(effect.shape[0], -1).T  # cells (pos-major, then head) x prompts


def _grad_root(model: Any, adapter: Adapter) -> tuple[Any, str, Any]:
    """Make the token embeddings a graph root when the weights do not require grad."""
    def root(x: torch.Tensor) -> torch.Tensor | None:
        return None if x.requires_grad else x.detach().requires_grad_()
    return get_path(model.module, adapter.embed), "module_out", root


def _check_differentiable(scores: torch.Tensor, metric: Any) -> None:
    """Attribution differentiates the metric: a float (``.item()``, ``float()``) or a tensor
    cut from the graph (``.detach()``, ``torch.no_grad``) has no gradient to give."""
    if not scores.requires_grad:
        raise InputError(
            f"method='attribution' differentiates the metric, but `{metric!r}` returned a "
            "value without a gradient (a Python float, or a tensor computed with .item(), "
            "float(), .detach() or under torch.no_grad). Return a tensor computed from the "
            "logits")
