"""Calling a model's blocks one by one on the suffix of a batch, with a recorded prefix.

A patch at position ``p`` cannot change positions before ``p`` (attention is causal), and a
patch at layer ``l`` cannot change layers before ``l``. So a patched run only needs blocks
``l..L-1`` on positions ``p..P-1``, attending to the keys and values of positions ``< p``
from the recorded corrupted run. :class:`BlockCaller` does exactly that, for any number of
copies of the batch, using the arguments the model itself passes to its blocks (captured
once from a forward that stops at the first block), so masks, rotary embeddings and
position ids are the model's own.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ipy_intervene.arch.sites import Adapter, get_path
from ipy_intervene.infra.hooks import HookSession
from ipy_intervene.sweep.record import cache_kwarg


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("captured")
        self.args, self.kwargs = args, kwargs


class PrefixKV:
    """A stand-in for the model's KV cache: keys/values of the prefix, for one layer."""

    is_compileable = False

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, keys], -2), torch.cat([self.values, values], -2)

    def get_seq_length(self, *args: Any) -> int:
        return 0 if self.keys is None else int(self.keys.shape[-2])


class BlockCaller:
    """Runs block ``k`` on hidden states ``[n * rows, P - prefix, d]`` (n copies of the batch).

    >>> caller = BlockCaller(model, adapter, kwargs, recording, prefix=3)   # doctest: +SKIP
    >>> hidden = caller(0, hidden)                                          # doctest: +SKIP
    """

    def __init__(self, model: Any, adapter: Adapter, kwargs: dict[str, Any], base: Any,
                 prefix: int) -> None:
        self.blocks = get_path(model.module, adapter.blocks)
        self.rows = int(kwargs["input_ids"].shape[0])
        self.base, self.prefix = base, prefix
        self.names = [n for n, prm in inspect.signature(self.blocks[0].forward).parameters.items()
                      if prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD)]
        one = self._capture(model, kwargs, 1)
        two = self._capture(model, kwargs, 2)
        self.template = one
        self.batched = {name for name in one if _batched(one[name], two[name])}
        from transformers.cache_utils import Cache  # first use: `import ipy_intervene` stays light

        self.cache_arg = next((n for n, v in one.items() if isinstance(v, Cache)), None)
        self.hidden_arg = self.names[0]
        self.kv = PrefixKV()

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        copies = hidden.shape[0] // self.rows
        arguments = {name: _repeat(value, copies) if name in self.batched else value
                     for name, value in self.template.items()}
        arguments[self.hidden_arg] = hidden
        if self.cache_arg is not None:
            self.kv.keys = _repeat(self.base.keys[layer][:, :, : self.prefix], copies)
            self.kv.values = _repeat(self.base.values[layer][:, :, : self.prefix], copies)
            arguments[self.cache_arg] = self.kv
        out = self.blocks[layer](**arguments)
        self.kv.keys = self.kv.values = None
        return out[0] if isinstance(out, (tuple, list)) else out

    def _capture(self, model: Any, kwargs: dict[str, Any], copies: int) -> dict[str, Any]:
        """The arguments the model passes to block 0 for the suffix (``copies`` x the batch)."""
        from transformers import DynamicCache

        p = self.prefix
        call = {k: _repeat(v[:, p:] if k in ("input_ids", "position_ids") else v, copies)
                for k, v in kwargs.items()}
        if p:
            call[cache_kwarg(model.module.base_model)] = DynamicCache(ddp_cache_data=[
                (_repeat(k[:, :, :p], copies), _repeat(v[:, :, :p], copies))
                for k, v in zip(self.base.keys, self.base.values)])
        call["use_cache"] = bool(p)

        def stop(module: Any, args: tuple, kw: dict) -> None:
            raise _Captured(args, kw)

        try:
            with HookSession() as hooks:
                hooks.pre(self.blocks[0], stop)
                model.module.base_model(**call)
        except _Captured as captured:
            return {**dict(zip(self.names, captured.args)), **captured.kwargs}
        raise RuntimeError("the model's forward never called its first block")


def _repeat(value: Any, copies: int) -> Any:
    if copies == 1:
        return value
    if isinstance(value, torch.Tensor):
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(_repeat(v, copies) for v in value)
    return value


def _batched(one: Any, two: Any) -> bool:
    """True when an argument grows with the batch (compared between 1 and 2 copies)."""
    if isinstance(one, torch.Tensor):
        return one.dim() > 0 and one.shape[0] != two.shape[0]
    if isinstance(one, tuple):
        return any(_batched(a, b) for a, b in zip(one, two))
    return False
