"""Which token ids a published tensor was computed from, so views can label its positions
with the real tokens (``ii.lens(model, acts)`` after ``%%trace``) and never guess.

A trace calls :func:`remember` with the names it published and its batch's ``input_ids``;
a tensor is remembered only when its first two dimensions are that batch's rows and positions
(so its row ``i`` and position ``p`` are exactly token ``input_ids[i, p]``). Entries go away
with their tensors.

>>> remember({"acts": [h0, h1]}, input_ids)          # doctest: +SKIP
>>> input_ids_of(h0) is input_ids                    # doctest: +SKIP
True
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator

import torch

_inputs: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def remember(names: dict[str, Any], input_ids: torch.Tensor) -> None:
    """Record ``input_ids`` [rows, positions] for every published tensor of that shape."""
    rows, length = input_ids.shape[:2]
    ids = input_ids.detach().cpu()
    for tensor in _tensors(names.values(), depth=2):
        if tensor.dim() >= 2 and tuple(tensor.shape[:2]) == (rows, length):
            key = id(tensor)
            _inputs[key] = (weakref.ref(tensor, lambda _, key=key: _inputs.pop(key, None)), ids)


def input_ids_of(tensor: torch.Tensor) -> torch.Tensor | None:
    """The ``input_ids`` a trace computed ``tensor`` from; None when not known exactly."""
    entry = _inputs.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        return None
    return entry[1]


def _tensors(values: Any, depth: int) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif depth and isinstance(value, (list, tuple)):
            yield from _tensors(value, depth - 1)
        elif depth and isinstance(value, dict):
            yield from _tensors(value.values(), depth - 1)
