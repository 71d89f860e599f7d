"""Site access: what reading, assigning, editing in place and skipping a site do to the value
flowing through the forward, for one invoke's view of the batch (its rows and its own
prompt's positions: :class:`~ipy_intervene.runtime.values.View`).

A hook wraps the value it sees in a holder (:class:`Inputs` before a module runs,
:class:`Output` after); serving a request reads from it or changes it, and the hook hands
the changed value back to the forward.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from ipy_intervene.arch import layout
from ipy_intervene.errors import SiteError
from ipy_intervene.habits.explain import guard_pattern
from ipy_intervene.infra.hooks import input_key, replace_input
from ipy_intervene.runtime import values
from ipy_intervene.runtime.values import View


class Request(Protocol):
    """A site request as serving reads it (``runtime/scheduler.py``'s ``Request``)."""

    access: str
    attr: str
    payload: Any
    envoy: Any
    site: Any
    line: int | None

    @property
    def label(self) -> str: ...


class Invoke(Protocol):
    """An invoke as serving reads it: its place in the batch."""

    index: int
    rows: slice


class Scheduler(Protocol):
    """What serving asks of the scheduler (``runtime/scheduler.py``): so this module never
    imports that one."""

    batch: Any
    step: int
    generate: int | None
    invokes: list[Any]
    skips: dict[int, list]
    ledger: "ReadLedger"

    def rows_to_split(self) -> Any: ...
    def record(self, req: Any, value: Any) -> None: ...


class ReadLedger:
    """The memory this step's reads were served (the copy-on-write ledger): an in-place
    change of memory a read was given is made on a copy (:func:`serve_value`).

    >>> ledger = ReadLedger(); x = torch.zeros(4); ledger.add(x[:2])
    >>> ledger.was_read(x[1:3]), ledger.was_read(x[2:])
    (True, False)
    """

    def __init__(self) -> None:
        self.reads: list[Any] = []

    def add(self, value: Any) -> None:
        self.reads.append(value)

    def clear(self) -> None:
        self.reads.clear()

    def was_read(self, value: Any) -> bool:
        """Whether ``value`` overlaps memory a read of this step was served."""
        mine = _spans(value)
        return bool(mine) and any(_overlap(mine, _spans(read)) for read in self.reads)


Span = tuple[int, int, int]  # (storage, first byte, last byte + 1)


def _spans(value: Any) -> list[Span]:
    """The bytes a value's tensors can reach (none for fake tensors of a dry run)."""
    if isinstance(value, torch.Tensor):
        if isinstance(value, FakeTensor) or value.numel() == 0:
            return []
        size = value.element_size()
        start = value.storage_offset() * size
        reach = sum((n - 1) * abs(st) for n, st in zip(value.shape, value.stride())) + 1
        return [(value.untyped_storage().data_ptr(), start, start + reach * size)]
    if isinstance(value, (tuple, list)):
        return [span for v in value for span in _spans(v)]
    return []


def _overlap(a: list[Span], b: list[Span]) -> bool:
    return any(p == q and s < f and t < e for p, s, e in a for q, t, f in b)


def view_of(sched: "Scheduler", inv: "Invoke", shape: layout.Layout, label: str = "") -> View:
    """Invoke ``inv``'s view, at this step, of a value laid out as ``shape``: its rows and,
    in a token batch, its own prompt's positions (the first ``cut`` positions of the padded
    batch are the longer prompts' padding; ``length``: the batch's positions now, the
    padded length plus the tokens generated so far)."""
    batch = sched.batch
    widths = getattr(batch, "widths", None)
    if not widths:
        return View(inv.rows, batch.size, label=label)
    return View(inv.rows, batch.size, batch.cut(inv.index), batch.length + max(sched.step, 0),
                shape, label)


def serve_model_output(sched: "Scheduler", inv: "Invoke", source: Any) -> Any:
    """``tracer.output`` for ``inv``: its view of the logits (with ``--generate``, of the
    token ids, its prompt and the new tokens)."""
    if sched.generate is not None and isinstance(source, torch.Tensor):
        view = view_of(sched, inv, layout.IDS, "tracer.output")
        if view.length:
            view = replace(view, length=source.shape[-1])
        return values.take(source, view)
    return values.take(source, view_of(sched, inv, layout.GENERIC, "tracer.output"))


class Inputs:
    """The (args, kwargs) of a module call, as a pre-hook sees them."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs, self.changed = args, kwargs, False
        self.parts: Parts | None = None

    def link(self, sched: "Scheduler", module: nn.Module) -> None:
        """Split the input into each invoke's part (see :class:`Parts`)."""
        key = input_key(self.args, self.kwargs)
        if sched.rows_to_split() is not None and key is not None:
            shape = layout.of_input(module, key)
            self.parts = Parts(self.first()[1], [view_of(sched, inv, shape)
                                                 for inv in sched.invokes])

    def settle(self) -> None:
        """Hand the forward the joined parts, if the input was split."""
        if self.parts is not None:
            self.set_first(self.first()[0], self.parts.joined())

    def first(self) -> tuple[int | str, Any]:
        key = input_key(self.args, self.kwargs)
        if key is None:
            raise SiteError("this module was called without arguments, so it has no `.input`")
        return key, self.args[0] if key == 0 else self.kwargs[key]

    def set_first(self, key: int | str, value: Any) -> None:
        self.args, self.kwargs = replace_input(self.args, self.kwargs, key, value)
        self.changed = True

    def serve(self, sched: "Scheduler", inv: "Invoke", req: "Request") -> Any:
        if req.access == "arrive":
            return None
        module = req.envoy.module
        if req.attr == "skip":
            view = view_of(sched, inv, layout.of_output(module), req.label)
            sched.skips.setdefault(id(module), []).append((view, req.payload, req))
            sched.record(req, req.payload)
            return None
        if req.attr == "inputs":  # the pair is served whole: join the parts first
            self.settle()
            self.parts = None
            return self._serve_pair(sched, inv, req)
        if self.parts is not None:
            return self.parts.serve(sched, inv, req)
        key, current = self.first()
        view = view_of(sched, inv, layout.of_input(module, key), req.label)
        return serve_value(sched, req, current, view, lambda v: self.set_first(key, v))

    def _serve_pair(self, sched: "Scheduler", inv: "Invoke", req: "Request") -> Any:
        current = (self.args, self.kwargs)
        view = view_of(sched, inv, layout.of_inputs(req.envoy.module, len(self.args)), req.label)
        if req.access == "read":
            value = values.take(current, view)
            sched.record(req, value[0])
            return value
        if req.access == "write":
            pair = check_inputs_pair(req.payload, req.label)
            args, kwargs = values.put(current, view, pair, req.label)
            self.args, self.kwargs, self.changed = tuple(args), dict(kwargs), True
            return None
        raise SiteError(f"`{req.label}` is an (args, kwargs) pair: edit `.input`, or assign "
                        f"a new pair to `.inputs`", line=req.line)


class Output:
    """A module's output, as a forward hook sees it."""

    def __init__(self, value: Any, is_root: bool) -> None:
        self.value, self.is_root, self.changed = value, is_root, False
        self.parts: Parts | None = None

    def set(self, value: Any) -> None:
        self.value, self.changed = value, True

    def link(self, sched: "Scheduler", module: nn.Module) -> None:
        """Split the output into each invoke's part (see :class:`Parts`)."""
        if sched.rows_to_split() is not None and not self.is_root:
            shape = layout.of_output(module)
            self.parts = Parts(self.value, [view_of(sched, inv, shape) for inv in sched.invokes])

    def settle(self) -> None:
        """Hand the forward the joined parts, if the output was split."""
        if self.parts is not None:
            self.set(self.parts.joined())

    def serve(self, sched: "Scheduler", inv: "Invoke", req: "Request") -> Any:
        if self.parts is not None:
            value = self.parts.serve(sched, inv, req)
        else:
            view = view_of(sched, inv, layout.of_output(req.envoy.module), req.label)
            value = serve_value(sched, req, self.value, view, self.set)
        return guard_pattern(value, req.envoy.module, req.label) if req.access == "read" else value


class Parts:
    """A value split into each invoke's view, for a ``--grad`` trace with several invokes.

    Each invoke reads and changes a tensor of its own; the forward goes on with the parts
    joined (``torch.cat``, with the padding positions a shorter invoke's view leaves out put
    back around its part), so the gradient reaches what each invoke read. A view of the
    batch would be a dead end for autograd: its ``.grad`` would stay ``None``.
    """

    def __init__(self, value: Any, views: list[View]) -> None:
        self.template, self.views = value, list(views)
        self.refused: dict[int, View] = {}   # invoke -> a view of a value it may not see cut
        self.parts = []
        for i, view in enumerate(views):
            try:
                part = values.take(value, view)
            except SiteError:  # an error when that invoke asks; its rows go on as they are
                self.refused[i] = view
                self.views[i] = View(view.rows, view.batch)
                part = values.take(value, self.views[i])
            self.parts.append(part)

    def serve(self, sched: "Scheduler", inv: "Invoke", req: "Request") -> Any:
        if inv.index in self.refused:
            values.take(self.template, replace(self.refused[inv.index], label=req.label))
        size = inv.rows.stop - inv.rows.start
        whole = View(slice(0, size), size, label=req.label)
        return serve_value(sched, req, self.parts[inv.index], whole,
                           lambda v: self.parts.__setitem__(inv.index, v))

    def joined(self) -> Any:
        return values.join(self.parts, self.template, self.views)


def serve_value(sched: "Scheduler", req: "Request", current: Any, view: View,
                setter: Callable[[Any], None]) -> Any:
    """Read, assign, augment (``+=``) or edit in place (``[...] =``) the part of ``current``
    that ``view`` sees (``arrive``: the moment a change is about to be made; nothing to do
    yet).

    Reads are served before writes, and what a read gave stays as it was: an in-place change
    of memory an earlier read of this step was given is made on a copy, which the forward
    goes on with (so ``pat = m.output`` then ``m.output[:, 0] = 0`` keeps ``pat``), and a
    second read of the same memory gets such a copy too (so ``m.output.mul_(0)``, or a helper
    that edits what it is passed, leaves ``pat`` as well)."""
    if req.access == "arrive":
        return None
    if req.access == "read":
        value = values.take(current, view)
        if sched.ledger.was_read(value):  # read again: what the first read gave must stay
            current = copy_value(current)
            setter(current)
            value = values.take(current, view)
        sched.record(req, value)
        sched.ledger.add(value)
        return value
    if req.access == "write":
        setter(values.put(current, view, req.payload, req.label))
        sched.record(req, req.payload)
        return None
    if sched.ledger.was_read(values.take(current, view)):
        current = copy_value(current)
        setter(current)
    mine = values.take(current, view)
    if req.access == "augment":
        op, operand = req.payload
        result = getattr(operator, op)(mine, operand)
        if result is not mine:
            setter(values.put(current, view, result, req.label))
        sched.record(req, result)
        return None
    index, value = req.payload
    values.set_index(mine, index, value, req.label, view.positions(current))
    sched.record(req, mine)
    return None


def copy_value(value: Any) -> Any:
    """A copy of a site's value whose tensors own their memory."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(copy_value(v) for v in value)
    return value


def check_inputs_pair(value: Any, label: str) -> tuple[tuple, dict]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not isinstance(value[0], (tuple, list)) or not isinstance(value[1], dict)):
        raise SiteError(f"`{label}` takes an (args, kwargs) pair; got {values.describe(value)}")
    return tuple(value[0]), dict(value[1])


# -- skips ----------------------------------------------------------------------------------

Skip = tuple[View, Any, "Request"]


def skipped_output(skips: list[Skip], batch: int, run_module: Callable[[], Any]) -> Any:
    """The output of a module some invokes skip: their values, the module's for the rest
    (and for the padding positions a shorter invoke's view leaves out)."""
    rows = sorted((s[0].rows.start, s[0].rows.stop) for s in skips)
    if _covers_all(rows, batch) and not any(s[0].cut for s in skips):
        return _join_skips(skips)
    return apply_skips(skips, run_module(), batch)


def apply_skips(skips: list[Skip], output: Any, batch: int) -> Any:
    for view, value, req in skips:
        output = values.put(output, view, value, req.label)
    return output


def _covers_all(rows: list[tuple[int, int]], batch: int) -> bool:
    position = 0
    for start, stop in rows:
        if start != position:
            return False
        position = stop
    return position == batch


def _join_skips(skips: list[Skip]) -> Any:
    ordered = sorted(skips, key=lambda s: s[0].rows.start)
    if len(ordered) == 1:
        return ordered[0][1]
    parts = [value for _, value, _ in ordered]
    if not all(isinstance(p, torch.Tensor) for p in parts):
        raise SiteError(f"`{ordered[0][2].label}`: when several invokes skip the same module, "
                        "each skip value must be a tensor")
    return torch.cat(parts, dim=0)
