"""The runs an AtP* sweep is made of: the source run (no autograd), the base run (autograd
on, every block's output behind a GradDrop gate) and the backward passes over that one
base graph, one plain and one per dropped layer.

GradDrop gate of layer ``l``: in the forward it copies the block's output; in the backward
it normally hands the gradient on, and while layer ``l`` is the dropped one it sends the
whole gradient to the block's input instead (the residual skip), so no gradient reaches
anything layer ``l`` computes: every path through that layer's residual contribution
(``attn_out`` + ``mlp_out``) is cut, the skip path is kept.

>>> base = base_run(model, adapter, kwargs, wanted, metric, positions)   # doctest: +SKIP
>>> grads = base.backward(dropped=3, layers=[0, 1, 2])                    # doctest: +SKIP
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ipy_intervene.arch import attention
from ipy_intervene.arch.attention import site_point
from ipy_intervene.arch.sites import MODULE_SITES, Adapter, SiteKind
from ipy_intervene.infra.hooks import HookSession, tap
from ipy_intervene.sweep.attribution import _check_differentiable, _grad_root
from ipy_intervene.sweep.record import record

KEY = "ii_atp"   # transformers attention implementation: ii's sites, plus the call's arguments


@dataclass
class Wanted:
    """What one run records at each layer of the grid: a module site (``kind``) and/or
    attention values (``q``, ``k``, ``v``, ``pattern``), and whether to keep the attention
    calls (mask and arguments, for recomputing a pattern exactly)."""

    layers: list[int]
    kind: SiteKind | None = None
    attention: tuple[str, ...] = ()

    @property
    def needs_calls(self) -> bool:
        return bool(self.attention)


@dataclass
class GradRecording:
    """One recorded forward: per-prompt metric, site values, attention values and calls."""

    scores: torch.Tensor
    sites: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    calls: dict[nn.Module, tuple[Any, dict]] = field(default_factory=dict)
    total: torch.Tensor | None = None          # the summed metric the backward passes start at
    gates: "_Gates | None" = None
    backwards: int = 0

    def backward(self, tensors: list[torch.Tensor], dropped: int | None) -> list[torch.Tensor]:
        """``d metric / d tensor`` for each tensor, with the gradient through layer
        ``dropped``'s residual contribution cut (None: the plain gradient)."""
        assert self.total is not None and self.gates is not None
        self.gates.dropped = dropped
        try:
            grads = torch.autograd.grad(self.total, tensors, retain_graph=True,
                                        allow_unused=True)
        finally:
            self.gates.dropped = None
        self.backwards += 1
        return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


def source_run(model: Any, adapter: Adapter, kwargs: dict, wanted: Wanted,
               positions: list[int], metric: Callable) -> GradRecording:
    """The run patched values come from (no autograd)."""
    with torch.no_grad(), HookSession() as session:
        run = GradRecording(scores=torch.empty(0))
        _attach(session, model.module, adapter, wanted, run)
        rec = record(model, adapter, kwargs, kind=wanted.kind or MODULE_SITES["resid_pre"],
                     layers=wanted.layers if wanted.kind else [], positions=positions)
        run.scores = metric(rec.logits).float()
        run.sites = rec.sites
    return run


def base_run(model: Any, adapter: Adapter, kwargs: dict, wanted: Wanted,
             positions: list[int], metric: Callable, metric_name: Any) -> GradRecording:
    """The run patched into, with autograd on and a GradDrop gate after every block."""
    module = model.module
    gates = _Gates()
    with torch.enable_grad(), HookSession() as session:
        run = GradRecording(scores=torch.empty(0), gates=gates)
        root, where, fn = _grad_root(model, adapter)
        tap(session, root, False, fn)
        for layer in range(adapter.n_layers):
            gates.attach(session, adapter.block(module, layer), layer)
        _attach(session, module, adapter, wanted, run)
        rec = record(model, adapter, kwargs, kind=wanted.kind or MODULE_SITES["resid_pre"],
                     layers=wanted.layers if wanted.kind else [], positions=positions)
        scores = metric(rec.logits)
        _check_differentiable(scores, metric_name)
        run.total = scores.sum()
    run.scores = scores.detach().float()
    run.sites = rec.sites
    return run


def _attach(session: HookSession, module: nn.Module, adapter: Adapter, wanted: Wanted,
            run: GradRecording) -> None:
    """Record the attention values ``wanted`` names (with the eager attention they need)."""
    if not wanted.attention:
        return
    use_capture(session, module, run.calls)
    for layer in wanted.layers:
        for name in wanted.attention:
            tap(session, site_point(module, adapter, layer, name), False,
                lambda x, key=(layer, name): run.values.__setitem__(key, x))


# -- GradDrop gates -----------------------------------------------------------------------


class _Gates:
    """The gates of one base run; ``dropped`` is the layer cut in the running backward."""

    def __init__(self) -> None:
        self.dropped: int | None = None
        self._inputs: dict[int, torch.Tensor] = {}

    def attach(self, session: HookSession, block: nn.Module, layer: int) -> None:
        tap(session, block, True, lambda x: self._inputs.__setitem__(layer, x))
        tap(session, block, False, lambda out: _Gate.apply(out, self._inputs.pop(layer),
                                                           layer, self))


class _Gate(torch.autograd.Function):
    """Identity in the forward; in the backward of the dropped layer, the skip path only."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, skip: torch.Tensor, layer: int,
                gates: _Gates) -> torch.Tensor:
        ctx.layer, ctx.gates = layer, gates
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        if ctx.gates.dropped == ctx.layer:
            return None, grad, None, None
        return grad, None, None, None


# -- the attention calls, kept to recompute patterns exactly -------------------------------


class _Capture:
    calls: dict | None = None


_CAPTURE = _Capture()


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
    """ii's eager attention with sites; remembers the mask and arguments of each call."""
    calls = _CAPTURE.calls
    if calls is not None:
        calls[module] = (attention_mask, kwargs)
    return attention.attention_with_sites(module, query, key, value, attention_mask, **kwargs)


def use_capture(session: HookSession, model: nn.Module, calls: dict) -> None:
    """For the session: attention with ii's sites, each call's arguments kept in ``calls``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    attention.use_sites(session, model)
    AttentionInterface.register(KEY, _attention)
    AttentionMaskInterface.register(KEY, eager_mask)
    for config in attention.configs(model):
        session.set_attr(config, "_attn_implementation", KEY)
    session.set_attr(_CAPTURE, "calls", calls)


def eager_pattern(module: nn.Module, call: tuple[Any, dict], query: torch.Tensor,
                  key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The pattern the model's own eager attention computes from these q, k (same mask and
    arguments as the recorded call): the softmax, exactly as the forward runs it."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    mask, kwargs = call
    if mask is not None and mask.shape[0] not in (1, query.shape[0]):
        mask = mask.repeat(query.shape[0] // mask.shape[0], *[1] * (mask.dim() - 1))
    return eager(module, query, key, value, mask, **kwargs)[1]
