"""Calling a model's blocks one by one on the suffix of a batch, with a recorded prefix.

A patch at position ``p`` cannot change positions before ``p`` (attention is causal), and a
patch at layer ``l`` cannot change layers before ``l``. So a patched run only needs blocks
``l..L-1`` on positions ``p..P-1``, attending to the keys and values of positions ``< p``
from the recorded corrupted run. :class:`BlockCaller` does exactly that, for any number of
copies of the batch, using the arguments the model itself passes to each block (captured
once per block from one forward of the suffix), so masks, rotary embeddings and position
ids are the model's own -- and each layer's own: where layers differ (sliding-window and
full attention layers with their masks and rotary tables, as in Gemma 2/3, Cohere 2, OLMo 3
or GPT-OSS), block ``k`` runs with the arguments the model gives block ``k``.
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
        self.hidden_arg = self.names[0]
        self.templates = self._capture(model, kwargs, 1)
        two = self._capture(model, kwargs, 2, every=False)[0]
        one = self.templates[0]
        self.batched = {name for name in one if name in two and _batched(one[name], two[name])}
        from transformers.cache_utils import Cache  # first use: `import ipy_intervene` stays light

        self.cache_arg = next((n for n, v in one.items() if isinstance(v, Cache)), None)
        self.kv = PrefixKV()

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        copies = hidden.shape[0] // self.rows
        arguments = {name: repeat_rows(value, copies) if name in self.batched else value
                     for name, value in self.templates[layer].items()}
        arguments[self.hidden_arg] = hidden
        if self.cache_arg is not None:
            self.kv.keys = repeat_rows(self.base.keys[layer][:, :, : self.prefix], copies)
            self.kv.values = repeat_rows(self.base.values[layer][:, :, : self.prefix], copies)
            arguments[self.cache_arg] = self.kv
        out = self.blocks[layer](**arguments)
        self.kv.keys = self.kv.values = None
        return out[0] if isinstance(out, (tuple, list)) else out

    def _capture(self, model: Any, kwargs: dict[str, Any], copies: int,
                 every: bool = True) -> list[dict[str, Any]]:
        """The arguments the model passes to each block (``every``; else block 0 only) for
        the suffix (``copies`` x the batch), the hidden states left out; the forward stops
        at the last block it needs."""
        from transformers import DynamicCache

        p = self.prefix
        call = {k: repeat_rows(v[:, p:] if k in ("input_ids", "position_ids") else v, copies)
                for k, v in kwargs.items()}
        if p:
            call[cache_kwarg(model.module.base_model)] = DynamicCache(ddp_cache_data=[
                (repeat_rows(k[:, :, :p], copies), repeat_rows(v[:, :, :p], copies))
                for k, v in zip(self.base.keys, self.base.values)])
        call["use_cache"] = bool(p)

        seen: list[dict[str, Any]] = []
        blocks = self.blocks if every else self.blocks[:1]

        def keep(layer: int):
            def hook(module: Any, args: tuple, kw: dict) -> None:
                got = {**dict(zip(self.names, args)), **kw}
                got.pop(self.hidden_arg, None)
                seen.append(got)
                if layer == len(blocks) - 1:
                    raise _Captured(args, kw)
            return hook

        try:
            with HookSession() as hooks:
                for layer, block in enumerate(blocks):
                    hooks.pre(block, keep(layer))
                model.module.base_model(**call)
        except _Captured:
            if len(seen) == len(blocks):
                return seen
        raise RuntimeError("the model's forward did not call each of its blocks once")


def repeat_rows(value: Any, copies: int) -> Any:
    """``value`` (a tensor, or a tuple of them) with its batch rows repeated ``copies`` times.

    >>> repeat_rows(torch.tensor([[1, 2]]), 2).tolist()
    [[1, 2], [1, 2]]
    """
    if copies == 1:
        return value
    if isinstance(value, torch.Tensor):
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(repeat_rows(v, copies) for v in value)
    return value


def _batched(one: Any, two: Any) -> bool:
    """True when an argument grows with the batch (compared between 1 and 2 copies)."""
    if isinstance(one, torch.Tensor):
        return one.dim() > 0 and one.shape[0] != two.shape[0]
    if isinstance(one, tuple):
        return any(_batched(a, b) for a, b in zip(one, two))
    return False
