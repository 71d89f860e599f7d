"""An invoke's view of a module's value, and writing values back into it.

Module outputs are tensors, tuples, lists, dicts or ``ModelOutput``s. An invoke owns a
contiguous block of batch rows and, in a token batch, its own prompt's positions: an
invoke whose longest prompt is shorter than the batch's does not see the padding the longer
prompts added (see :class:`View`). Reading gives views (so in-place edits reach the running
forward), writing returns a new value with the invoke's part replaced.

>>> import torch
>>> x = torch.zeros(4, 3)
>>> take_rows(x, slice(2, 4), 4).shape
torch.Size([2, 3])
>>> put_rows(x, slice(2, 4), 4, torch.ones(2, 3), "h.output")[:, 0]
tensor([0., 0., 1., 1.])
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ipy_intervene.arch.layout import GENERIC, Layout, Unknown
from ipy_intervene.errors import PositionError, SiteError, ValueMismatchError
from ipy_intervene.infra.last_trace import past_end


@dataclass(frozen=True)
class View:
    """What one invoke sees of a site's value: ``rows`` of the batch (``batch`` rows in all)
    and, on the dimensions that are positions (:mod:`ipy_intervene.arch.layout`), all but the
    first ``cut``: the padding the batch's longer prompts added, which the invoke would not
    have run alone. ``length`` is the batch's positions at this step (the padded length,
    plus the tokens generated so far for keys); a dimension is cut only where its size is
    that.

    >>> from ipy_intervene.arch.layout import FEATURES
    >>> h = torch.arange(2 * 5 * 3.).reshape(2, 5, 3)
    >>> short = View(slice(1, 2), 2, cut=3, length=5, layout=FEATURES)
    >>> take(h, short).shape                       # row 1's last 2 positions
    torch.Size([1, 2, 3])
    >>> put(h, short, 0, "h.output")[1, :, 0]      # its 3 padding positions keep their values
    tensor([15., 18., 21.,  0.,  0.])
    """

    rows: slice
    batch: int
    cut: int = 0
    length: int = 0
    layout: Layout = GENERIC
    label: str = ""

    @property
    def whole(self) -> bool:
        return self.cut == 0 and covers(self.rows, self.batch)

    def at(self, key: Any) -> "View":
        return replace(self, layout=self.layout.at(key)) if self.cut else self

    def index(self, value: torch.Tensor, where: str) -> tuple | None:
        """The index of the view in ``value`` (None: a leaf without the batch's rows, which
        every invoke sees whole)."""
        if value.dim() == 0 or value.shape[0] != self.batch:
            return None
        dims = self._cut_dims(value, where) if self.cut else ()
        index: list[Any] = [self.rows] + [slice(None)] * max(dims, default=0)
        for dim in dims:
            index[dim] = slice(self.cut, None)
        return tuple(index)

    def positions(self, value: Any) -> frozenset[int] | None:
        """The dimensions of ``value`` (the batch's leaf this view is of) that are
        positions, as its layout says; None when it does not (messages use this)."""
        if not isinstance(value, torch.Tensor) or not self.length:
            return None
        try:
            return frozenset(self.layout.dims(tuple(value.shape), self.length))
        except Unknown:
            return None

    def _cut_dims(self, value: torch.Tensor, where: str) -> tuple[int, ...]:
        try:
            return self.layout.dims(tuple(value.shape), self.length)
        except Unknown as exc:
            own = self.length - self.cut
            shape = [self.rows.stop - self.rows.start, *value.shape[1:]]
            raise SiteError(
                f"`{where}` is a tensor of shape {shape}, and which of its "
                f"dimensions are positions is not known ({exc}). This invoke's prompt is "
                f"{own} tokens and the batch's longest {self.length}: an invoke sees its own "
                f"prompt's positions, so its view must leave out {self.cut} padding "
                "positions, and guessing where could give another prompt's padding or cut "
                "the wrong dimension. Read it in an invoke as long as the longest prompt, or "
                "give the prompts to one invoke (`tracer.invoke([a, b])`: its rows padded to "
                "its longest; `_trace.positions` / `ii.positions` map each prompt's tokens), "
                "or trace this prompt in a cell of its own") from None


def covers(rows: slice, batch: int) -> bool:
    return rows.start == 0 and rows.stop == batch


def _key(path_key: Any) -> str:
    return f"[{path_key!r}]"


def take(value: Any, view: View, where: str = "") -> Any:
    """What ``view`` sees of ``value``: views of its tensors; the value itself when the
    view is all of it."""
    if view.whole:
        return value
    if isinstance(value, torch.Tensor):
        index = view.index(value, where or view.label)
        return value if index is None else value[index]
    if isinstance(value, (tuple, list)):
        return type(value)(take(v, view.at(i), f"{where or view.label}[{i}]")
                           for i, v in enumerate(value))
    if isinstance(value, dict):
        return _same_mapping(value, {k: take(v, view.at(k), f"{where or view.label}{_key(k)}")
                                     for k, v in value.items()})
    return value


def put(old: Any, view: View, new: Any, where: str) -> Any:
    """``old`` with the part ``view`` sees replaced by ``new`` (moved to old's device and
    dtype); where the view leaves padding positions out, they keep old's values."""
    if isinstance(old, torch.Tensor):
        return _put_tensor(old, view, new, where)
    if isinstance(old, (tuple, list)):
        if not isinstance(new, (tuple, list)) or len(new) != len(old):
            raise ValueMismatchError(
                f"`{where}` is a {type(old).__name__} of {len(old)} items; the value assigned is "
                f"{describe(new)}. Assign the same structure, or edit one item in place")
        return type(old)(put(o, view.at(i), n, f"{where}[{i}]")
                         for i, (o, n) in enumerate(zip(old, new)))
    if isinstance(old, dict):
        if not isinstance(new, dict) or set(new) != set(old):
            raise ValueMismatchError(f"`{where}` is a mapping with keys {sorted(old)}; the value "
                                     f"assigned is {describe(new)}")
        return _same_mapping(old, {k: put(old[k], view.at(k), new[k], f"{where}{_key(k)}")
                                   for k in old})
    return new


def join(parts: list[Any], template: Any, views: list[View], where: str = "") -> Any:
    """The inverse of taking each invoke's view: ``parts`` (one per invoke, in batch order)
    joined into a value shaped like ``template``, the padding positions a view left out
    taken from the template. A leaf without a batch dimension is the one an invoke replaced
    (the last), else the template's.

    >>> x = torch.arange(4.)
    >>> join([x[:1], x[1:] * 2], x, [View(slice(0, 1), 4), View(slice(1, 4), 4)])
    tensor([0., 2., 4., 6.])
    """
    batch = views[0].batch
    if isinstance(template, torch.Tensor) and template.dim() >= 1 and template.shape[0] == batch:
        blocks = []
        for part, view in zip(parts, views):
            index = view.index(template, where or view.label)
            if index is None or len(index) == 1:
                blocks.append(part)
                continue
            block = template[view.rows].clone()   # the padding it leaves out, then its part
            block[(slice(None), *index[1:])] = part
            blocks.append(block)
        return torch.cat(blocks)
    if isinstance(template, (tuple, list)):
        return type(template)(join([p[i] for p in parts], t, [v.at(i) for v in views],
                                   f"{where}[{i}]") for i, t in enumerate(template))
    if isinstance(template, dict):
        return _same_mapping(template, {k: join([p[k] for p in parts], template[k],
                                                [v.at(k) for v in views], f"{where}{_key(k)}")
                                        for k in template})
    return next((p for p in reversed(parts) if p is not template), template)


def take_rows(value: Any, rows: slice, batch: int) -> Any:
    """The rows of ``value`` an invoke owns (all positions); the value itself when it owns
    them all."""
    return take(value, View(rows, batch))


def put_rows(old: Any, rows: slice, batch: int, new: Any, where: str) -> Any:
    """``old`` with the invoke's rows replaced by ``new`` (moved to old's device and dtype)."""
    return put(old, View(rows, batch), new, where)


def _put_tensor(old: torch.Tensor, view: View, new: Any, where: str) -> torch.Tensor:
    index = None if view.whole else view.index(old, where)
    expected = old.shape if index is None else old[index].shape
    new = as_tensor_like(new, old, expected, where)
    if index is None:
        return new if new.shape == expected else new.expand(expected).clone()
    result = old.clone()
    result[index] = new
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


def set_index(view: Any, index: Any, value: Any, where: str,
              positions: frozenset[int] | None = None) -> None:
    """``view[index] = value`` with a clear error when the shapes do not fit (``positions``:
    the dimensions that are positions, when known)."""
    if isinstance(view, tuple):
        raise ValueMismatchError(
            f"`{where}` is {describe(view)}: this module returns a tuple, and a tuple's "
            f"items cannot be assigned. Edit the tensor it holds instead: "
            f"`{where}[0][{format_index(index)}] = ...` (the hidden states), or replace the "
            f"whole output: `{where} = (new, *{where}[1:])`")
    if not isinstance(view, torch.Tensor):
        view[index] = value
        return
    label = f"{where}[{format_index(index)}]"
    check_index(view.shape, index, label, positions)
    target = view[index].shape
    view[index] = as_tensor_like(value, view, target, label)


def check_index(shape: torch.Size, index: Any, label: str,
                positions: frozenset[int] | None = None) -> None:
    """A :class:`PositionError` (a SiteError) for an int of ``index`` past the end of its
    dimension (a position past the prompt names the prompt's length; ``positions``: the
    dimensions that are positions, when the value's layout says).

    >>> check_index(torch.Size([1, 5, 8]), (slice(None), 7), "h.output[:, 7]")
    Traceback (most recent call last):
    ...
    ipy_intervene.errors.PositionError: index 7 is past the end of dimension 1 of `h.output[:, 7]` (shape [1, 5, 8]): it has 5 entries (0..4, or -5..-1)
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
            known = None if positions is None else dim in positions
            raise PositionError(past_end(item, dim, size, label, shape, position=known))


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
