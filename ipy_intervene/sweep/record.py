"""One recorded forward: logits where the metric reads, site values, residual stream, K/V.

Sweeps record the clean and the corrupted run once; every patched run then starts from
these recordings instead of recomputing what a patch cannot change. Recordings are not kept
across sweeps: proving one current would cost the forward it saves (``sweep/memo.py``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from ipy_intervene.arch.sites import Adapter, SiteKind, get_path
from ipy_intervene.infra.hooks import site_hooks


@dataclass
class Recording:
    """What one forward left behind (tensors keep their graph when recorded with grad)."""

    logits: torch.Tensor                    # [rows, len(positions), vocab]
    sites: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [rows, P, d]
    stream: list[torch.Tensor] = field(default_factory=list)       # L + 1 points [rows, P, d]
    keys: list[torch.Tensor] = field(default_factory=list)         # layer -> [rows, h, P, dh]
    values: list[torch.Tensor] = field(default_factory=list)
    noise: torch.Tensor | None = None       # what was added to the token embeddings


def record(model: Any, adapter: Adapter, kwargs: dict[str, Any], *, kind: SiteKind,
           layers: list[int], positions: list[int] | None, stream: bool = False,
           noise: torch.Tensor | None = None) -> Recording:
    """Run the model once on ``kwargs`` and keep what the sweep needs.

    ``positions`` are the (non-negative) logit positions to keep (None: all); ``stream`` also
    keeps the residual stream and the attention keys/values of every layer; ``noise`` is
    added to the token embeddings (causal tracing).
    """
    module = model.module
    rec = Recording(logits=torch.empty(0), noise=noise)
    hooks = [(adapter.module(module, kind.name, layer), kind.where, _keep(rec.sites, layer))
             for layer in layers]
    if stream:
        rec.stream = [None] * (adapter.n_layers + 1)
        hooks += [(adapter.block(module, layer), "block_in", _keep(rec.stream, layer))
                  for layer in range(adapter.n_layers)]
        hooks.append((adapter.block(module, adapter.n_layers - 1), "block_out",
                      _keep(rec.stream, adapter.n_layers)))
    if noise is not None:
        hooks.append((get_path(module, adapter.embed), "module_out", lambda x: x + noise))
    from transformers import (
        DynamicCache,  # imported on first use: `import ipy_intervene` stays light
    )

    cache = DynamicCache() if stream else None
    with site_hooks(hooks):
        out = module(**kwargs, use_cache=stream, **{cache_kwarg(module): cache},
                     **_logits_kwargs(model, positions, kwargs["input_ids"].shape[1]))
    length = kwargs["input_ids"].shape[1]
    rec.logits = out.logits if positions is None else _select(out.logits, positions, length)
    if stream:
        rec.keys = [layer.keys for layer in cache.layers]
        rec.values = [layer.values for layer in cache.layers]
    return rec


def forward_logits(model: Any, kwargs: dict[str, Any], positions: list[int]) -> torch.Tensor:
    """One forward of the whole model (no cache): its logits at ``positions`` ``[rows,
    len(positions), vocab]``, the unembedding run from the first of them on where it can.

    >>> forward_logits(model, batch.kwargs, [14]).shape        # doctest: +SKIP
    torch.Size([1, 1, 50257])
    """
    length = kwargs["input_ids"].shape[1]
    out = model.module(**kwargs, use_cache=False, **_logits_kwargs(model, positions, length))
    return _select(out.logits, positions, length)


def cache_kwarg(module: Any) -> str:
    """The name a forward takes its key/value cache by: ``cache`` (transformers >= 5.2x, which
    warns on the old name) or ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _keep(store: Any, index: int):
    def keep(x: torch.Tensor) -> None:
        store[index] = x
    return keep


def _logits_kwargs(model: Any, positions: list[int] | None, length: int) -> dict[str, Any]:
    if positions is None or "logits_to_keep" not in model._forward_params:
        return {}
    first = min(positions)
    return {"logits_to_keep": length - first}


def _select(logits: torch.Tensor, positions: list[int], length: int) -> torch.Tensor:
    """Logits at ``positions`` from logits of the last ``logits.shape[1]`` positions."""
    offset = length - logits.shape[1]
    index = torch.tensor([p - offset for p in positions], device=logits.device)
    return logits.index_select(1, index)
