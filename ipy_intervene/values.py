"""An invoke's rows of a module's value, and writing values back into them.

Module outputs are tensors, tuples, lists, dicts or ``ModelOutput``s. An invoke owns a
contiguous block of batch rows; reading gives views of those rows (so in-place edits reach
the running forward), writing returns a new value with those rows replaced.

>>> import torch
>>> x = torch.zeros(4, 3)
>>> take_rows(x, slice(2, 4), 4).shape
torch.Size([2, 3])
>>> put_rows(x, slice(2, 4), 4, torch.ones(2, 3), "h.output")[:, 0]
tensor([0., 0., 1., 1.])
"""

from __future__ import annotations

from typing import Any

import torch

from ipy_intervene.batch import PositionError, past_end
from ipy_intervene.errors import ValueMismatchError


def covers(rows: slice, batch: int) -> bool:
    return rows.start == 0 and rows.stop == batch


def take_rows(value: Any, rows: slice, batch: int) -> Any:
    """The rows of ``value`` an invoke owns; the value itself when it owns them all."""
    if covers(rows, batch):
        return value
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() >= 1 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return _same_mapping(value, {k: take_rows(v, rows, batch) for k, v in value.items()})
    return value


def put_rows(old: Any, rows: slice, batch: int, new: Any, where: str) -> Any:
    """``old`` with the invoke's rows replaced by ``new`` (moved to old's device and dtype)."""
    if isinstance(old, torch.Tensor):
        return _put_tensor(old, rows, batch, new, where)
    if isinstance(old, (tuple, list)):
        if not isinstance(new, (tuple, list)) or len(new) != len(old):
            raise ValueMismatchError(
                f"`{where}` is a {type(old).__name__} of {len(old)} items; the value assigned is "
                f"{describe(new)}. Assign the same structure, or edit one item in place")
        return type(old)(put_rows(o, rows, batch, n, f"{where}[{i}]")
                         for i, (o, n) in enumerate(zip(old, new)))
    if isinstance(old, dict):
        if not isinstance(new, dict) or set(new) != set(old):
            raise ValueMismatchError(f"`{where}` is a mapping with keys {sorted(old)}; the value "
                                     f"assigned is {describe(new)}")
        return _same_mapping(old, {k: put_rows(old[k], rows, batch, new[k], f"{where}[{k!r}]")
                                   for k in old})
    return new


def join_rows(parts: list[Any], template: Any, batch: int) -> Any:
    """The inverse of taking each invoke's rows: ``parts`` (one per invoke, in batch order)
    joined into a value shaped like ``template``. A leaf without a batch dimension is the one
    an invoke replaced (the last), else the template's.

    >>> x = torch.arange(4.)
    >>> join_rows([x[:1], x[1:] * 2], x, 4)
    tensor([0., 2., 4., 6.])
    """
    if isinstance(template, torch.Tensor) and template.dim() >= 1 and template.shape[0] == batch:
        return torch.cat(parts)
    if isinstance(template, (tuple, list)):
        return type(template)(join_rows([p[i] for p in parts], t, batch)
                              for i, t in enumerate(template))
    if isinstance(template, dict):
        return _same_mapping(template, {k: join_rows([p[k] for p in parts], template[k], batch)
                                        for k in template})
    return next((p for p in reversed(parts) if p is not template), template)


def _put_tensor(old: torch.Tensor, rows: slice, batch: int, new: Any, where: str) -> torch.Tensor:
    full = covers(rows, batch) or old.dim() == 0 or old.shape[0] != batch
    expected = old.shape if full else old[rows].shape
    new = as_tensor_like(new, old, expected, where)
    if full:
        return new if new.shape == expected else new.expand(expected).clone()
    result = old.clone()
    result[rows] = new
    return result


def as_tensor_like(new: Any, old: torch.Tensor, expected: torch.Size, where: str) -> torch.Tensor:
    """``new`` as a tensor on old's device and dtype, checked to broadcast to ``expected``."""
    if isinstance(new, (int, float, bool)):
        new = torch.tensor(new)
    if not isinstance(new, torch.Tensor):
        raise ValueMismatchError(f"`{where}` is a tensor of shape {list(expected)}; the value "
                                 f"assigned is {describe(new)}")
    if not broadcasts_to(new.shape, expected):
        raise ValueMismatchError(f"`{where}` has shape {list(expected)}; the value assigned has "
                                 f"shape {list(new.shape)}, which does not broadcast to it")
    if new.is_complex() and not old.is_complex():
        raise ValueMismatchError(f"`{where}` is {str(old.dtype).removeprefix('torch.')}; the "
                                 f"value assigned is {str(new.dtype).removeprefix('torch.')} "
                                 "(complex), and casting would drop its imaginary part")
    return new.to(device=old.device, dtype=old.dtype)


def broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def set_index(view: Any, index: Any, value: Any, where: str) -> None:
    """``view[index] = value`` with a clear error when the shapes do not fit."""
    if not isinstance(view, torch.Tensor):
        view[index] = value
        return
    label = f"{where}[{format_index(index)}]"
    check_index(view.shape, index, label)
    target = view[index].shape
    view[index] = as_tensor_like(value, view, target, label)


def check_index(shape: torch.Size, index: Any, label: str) -> None:
    """A :class:`PositionError` (a SiteError) for an int of ``index`` past the end of its dimension (a position
    past the prompt names the prompt's length).

    >>> check_index(torch.Size([1, 5, 8]), (slice(None), 7), "h.output[:, 7]")
    Traceback (most recent call last):
    ...
    ipy_intervene.batch.PositionError: index 7 is past the end of dimension 1 of `h.output[:, 7]` (shape [1, 5, 8]): it has 5 entries (0..4, or -5..-1)
    """
    items = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in items):
        return  # tensor and mask indices: torch checks them
    if sum(i is Ellipsis for i in items) > 1:
        return
    cut = next((k for k, i in enumerate(items) if i is Ellipsis), len(items))
    head = [i for i in items[:cut] if i is not None]
    tail = [i for i in items[cut + 1:] if i is not None]
    placed = list(enumerate(head)) + [(len(shape) - len(tail) + k, i) for k, i in enumerate(tail)]
    for dim, item in placed:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= dim < len(shape):
            continue
        size = shape[dim]
        if not -size <= item < size:
            raise PositionError(past_end(item, dim, size, label, shape))


def format_index(index: Any) -> str:
    items = index if isinstance(index, tuple) else (index,)
    return ", ".join(_format_item(i) for i in items)


def _format_item(item: Any) -> str:
    if isinstance(item, slice):
        parts = ["" if p is None else str(p) for p in (item.start, item.stop, item.step)]
        return ":".join(parts[:2] if item.step is None else parts)
    if item is Ellipsis:
        return "..."
    if isinstance(item, torch.Tensor):
        return f"<tensor {list(item.shape)}>"
    return repr(item)


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def shape_of(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return tuple(value[0].shape)
    logits = getattr(value, "logits", None)
    return tuple(logits.shape) if isinstance(logits, torch.Tensor) else None


def dtype_of(value: Any) -> str | None:
    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch.")
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return str(value[0].dtype).removeprefix("torch.")
    return None


def _same_mapping(old: dict, items: dict) -> dict:
    try:
        return type(old)(**items) if type(old) is not dict else items
    except TypeError:
        return items
