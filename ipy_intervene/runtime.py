"""Run a compiled cell against one forward (or ``generate``) of the model.

Each invoke's code runs on its own greenlet. When it asks for a site it switches to the
main greenlet, which is running the forward; the hook of that module hands back the real
tensor (the invoke's batch rows) and resumes the code. Hooks exist only while a cell runs
and are removed in ``finally``.

>>> result = run_cell(model, compile_cell("h = model.transformer.h[0].output", has_input=True),
...                   {"model": model}, line_input="When Mary and John")   # doctest: +SKIP
"""

from __future__ import annotations

import operator
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import greenlet
import torch
from torch import nn

from ipy_intervene import values
from ipy_intervene.compile import BRIDGE, TRACER, CompiledCell
from ipy_intervene.errors import InterventionError, SiteError
from ipy_intervene.graph import InterventionGraph, Site, Visit
from ipy_intervene.model import Batch, Envoy, Model
from ipy_intervene.validate import HookPlan, validate

_ACTIVE: "Bridge | None" = None
_NO_INPUT = object()   # no INPUT on the magic line
_WAIT = object()       # a request this moment cannot answer
_DONE = object()
PRE, OUT = "pre", "out"


def active_bridge() -> "Bridge | None":
    """The bridge of the trace running now, or None."""
    return _ACTIVE


class _StopForward(BaseException):
    """Raised from a hook after ``tracer.stop()``; ends the forward early."""


@dataclass
class Request:
    """What an invoke's code is waiting for."""

    kind: str                       # site | names | model_output
    envoy: Envoy | None = None
    attr: str = ""                  # output | input | inputs | skip
    access: str = "read"            # read | write | edit | augment | skip
    step: int = 0
    site: Site | None = None
    payload: Any = None
    names: tuple[str, ...] = ()
    line: int | None = None

    @property
    def phase(self) -> str:
        return OUT if self.attr == "output" else PRE

    @property
    def label(self) -> str:
        if self.kind == "names":
            return ", ".join(f"`{n}`" for n in self.names)
        if self.kind == "model_output":
            return "tracer.output"
        return f"{self.envoy.path or 'model'}.{self.attr}"


@dataclass
class Invoke:
    index: int
    rows: slice
    glet: greenlet.greenlet | None = None
    pending: Request | None = None
    step: int = 0
    last: Request | None = None


@dataclass
class Outcome:
    """What a run produced, before names are published."""

    graph: InterventionGraph
    output: Any
    batch: Batch
    steps: int
    seconds: float
    stopped_at: int | None = None


class _IndexMaker:
    """Turns subscript syntax into the index value it denotes."""

    def __getitem__(self, key: Any) -> Any:
        return key


class Bridge:
    """What the rewritten cell calls (``__ii__``); also drives the forward and its hooks."""

    index = _IndexMaker()  # ``__ii__.index[:, -1]`` -> ``(slice(None), -1)``

    def __init__(self, model: Model, cell: CompiledCell, graph: InterventionGraph,
                 plan: HookPlan, ns: dict, generate: int | None) -> None:
        self.model, self.cell, self.graph, self.plan, self.ns = model, cell, graph, plan, ns
        self.generate = generate
        self.root = model.module
        self.invokes: list[Invoke] = []
        self.main = greenlet.getcurrent()
        self.batch: Batch | None = None
        self.step = -1
        self.running = False
        self.finished = False
        self.final_output: Any = None
        self.bound_names: set[str] = set()
        self.fired: dict[tuple[str, int], int] = {}
        self.retained: dict[tuple[str, int], Any] = {}  # this step's values of hooked modules
        self.serving: tuple[str, int] | None = None     # the hook whose requests are served now
        self.hooked: set[tuple[str, int]] = set()
        self.handles: list[Any] = []
        self.restore_forward: list[tuple[nn.Module, bool, Any]] = []
        self.skips: dict[int, list[tuple[slice, Any, Request]]] = {}
        self.adhoc = 0
        self.stop_line: int | None = None
        self.tracer = Tracer(self)

    # -- called from the cell ------------------------------------------------------------

    def read(self, envoy: Any, attr: str, sid: int | None) -> Any:
        __tracebackhide__ = True
        return self._ask(envoy, attr, "read", sid, None)

    def write(self, envoy: Any, attr: str, value: Any, sid: int | None) -> None:
        __tracebackhide__ = True
        self._ask(envoy, attr, "write", sid, value)

    def setitem(self, envoy: Any, attr: str, index: Any, value: Any, sid: int | None) -> None:
        __tracebackhide__ = True
        self._ask(envoy, attr, "edit", sid, (index, value))

    def augment(self, envoy: Any, attr: str, op: str, value: Any, sid: int | None) -> None:
        __tracebackhide__ = True
        self._ask(envoy, attr, "augment", sid, (op, value))

    def skip(self, envoy: Any, value: Any, sid: int | None) -> None:
        __tracebackhide__ = True
        self._ask(envoy, "skip", "skip", sid, value)

    def call(self, target: Any, sid: int | None, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        if isinstance(target, nn.Module):
            target = self.model.envoy_for(target) or target
        if not isinstance(target, Envoy):
            return target(*args, **kwargs)
        result = call_module(target, args, kwargs)
        site = self.graph.site(sid)
        if site is not None:
            site.visits.append(Visit(max(self.step, 0), values.shape_of(result),
                                     values.dtype_of(result)))
        return result

    def model_output(self, sid: int | None) -> Any:
        __tracebackhide__ = True
        inv = self._current_invoke(required=False)
        if inv is None:
            if not self.finished:
                raise InterventionError("tracer.output is only available inside an invoke or "
                                        "after the forward, not before it")
            return self.final_output
        request = Request("model_output", step=inv.step, site=self.graph.site(sid))
        return self._wait(inv, request)

    def wait_for(self, names: tuple[str, ...], line: int) -> None:
        __tracebackhide__ = True
        inv = self._current_invoke(required=False)
        if inv is None or set(names) <= self.bound_names:
            return
        self._wait(inv, Request("names", names=names, line=line))

    def bound(self, names: tuple[str, ...]) -> None:
        self.bound_names.update(names)

    def branch(self, region: int, test: Any) -> Any:
        r = self.graph.regions[region]
        r.entered += 1
        if test:
            r.taken += 1
        return test

    def loop(self, region: int, iterable: Any) -> Iterator[Any]:
        r = self.graph.regions[region]
        for item in iterable:
            r.entered += 1
            yield item

    # -- requests ------------------------------------------------------------------------

    def _current_invoke(self, required: bool = True, what: str = "a module site") -> Invoke | None:
        current = greenlet.getcurrent()
        for inv in self.invokes:
            if inv.glet is current:
                return inv
        if required:
            when = "after the forward has finished" if self.finished else "before the forward"
            raise SiteError(f"{what} can only be used inside an invoke; this code runs {when}")
        return None

    def _ask(self, envoy: Any, attr: str, access: str, sid: int | None, payload: Any) -> Any:
        __tracebackhide__ = True
        inv = self._current_invoke()
        if isinstance(envoy, nn.Module):
            envoy = self.model.envoy_for(envoy) or envoy
        if not isinstance(envoy, Envoy):
            raise SiteError(f"`.{attr}` needs a module of the model; got {type(envoy).__name__}")
        site = self.graph.site(sid)
        if site is None:
            site = self.graph.add_dynamic_site(line=0, path=envoy.path, attr=attr, access=access,
                                               invoke=inv.index)
        request = Request("site", envoy, attr, access, inv.step, site, payload, line=site.line)
        if self._already_ran(inv, request):
            return self._past_value(inv, request)
        self._ensure_hook(envoy.module, request.phase)
        if attr == "skip":
            self._ensure_hook(envoy.module, OUT)  # applies the skip if the module ran anyway
        return self._wait(inv, request)

    def _wait(self, inv: Invoke, request: Request) -> Any:
        __tracebackhide__ = True
        return self.main.switch(request)

    def _already_ran(self, inv: Invoke, req: Request) -> bool:
        if req.step < self.step:
            raise SiteError(f"`{req.label}` at step {req.step} has already passed: generation is "
                            f"at step {self.step}", line=req.line)
        key = (req.phase, id(req.envoy.module))
        return self.running and key != self.serving and self.fired.get(key) == req.step

    def _past_value(self, inv: Invoke, req: Request) -> Any:
        """A read of a site that already ran this step gets the value that flowed on."""
        key = (req.phase, id(req.envoy.module))
        if req.access == "read" and req.attr != "skip" and key in self.retained:
            return self.retained[key].serve(self, inv, req)
        before = ""
        if inv.last is not None and inv.last.kind == "site":
            where = f" (line {inv.last.line})" if inv.last.line else ""
            before = f" after `{inv.last.label}`{where}, which the model runs later"
        change = "change" if req.access != "read" else "read"
        raise SiteError(f"`{req.label}` has already run in this forward when this line asks to "
                        f"{change} it{before}: one forward cannot go back. Use the sites in the "
                        f"order the model runs them, or put them in two invokes", line=req.line)

    # -- hooks ---------------------------------------------------------------------------

    def _ensure_hook(self, module: nn.Module, phase: str) -> None:
        key = (phase, id(module))
        if key in self.hooked:
            return
        self.hooked.add(key)
        if phase == PRE:
            hook = self._pre_hook_for(module)
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            hook = self._out_hook_for(module)
            self.handles.append(module.register_forward_hook(hook))

    def install_hooks(self) -> None:
        self._ensure_hook(self.root, PRE)
        self._ensure_hook(self.root, OUT)
        for module in self.plan.pre.values():
            self._ensure_hook(module, PRE)
        for module in self.plan.out.values():
            self._ensure_hook(module, OUT)
        for module in self.plan.skip.values():
            self._ensure_skippable(module)

    def _pre_hook_for(self, module: nn.Module):
        key, is_root = id(module), module is self.root

        def pre_hook(mod, args, kwargs):
            __tracebackhide__ = True
            if self.adhoc:
                return None
            if is_root:
                self.step += 1
                self.retained.clear()
            self.fired[(PRE, key)] = self.step
            holder = _Inputs(args, kwargs)
            self.retained[(PRE, key)] = holder
            if not self._wanted(PRE, key):
                return None
            self._serve(holder, PRE, key)
            self._after_serve()
            return (holder.args, holder.kwargs) if holder.changed else None

        return pre_hook

    def _out_hook_for(self, module: nn.Module):
        key, is_root = id(module), module is self.root

        def out_hook(mod, args, output):
            __tracebackhide__ = True
            if self.adhoc:
                return None
            self.fired[(OUT, key)] = self.step
            holder = _Output(output, is_root)
            if key in self.skips:  # skipped through an alias: the module ran, its output goes
                holder.set(self._apply_skips(self.skips.pop(key), output))
            self.retained[(OUT, key)] = holder
            wanted = self._wanted(OUT, key) or (is_root and self._wants_logits())
            if not wanted:
                return holder.value if holder.changed else None
            self._serve(holder, OUT, key)
            self._after_serve()
            return holder.value if holder.changed else None

        return out_hook

    def _wanted(self, phase: str, key: int) -> bool:
        for inv in self.invokes:
            p = inv.pending
            if p is not None and p.kind == "site" and p.step == self.step \
                    and p.phase == phase and id(p.envoy.module) == key:
                return True
        return False

    def _wants_logits(self) -> bool:
        return self.generate is None and any(
            inv.pending is not None and inv.pending.kind == "model_output" for inv in self.invokes)

    def _after_serve(self) -> None:
        if self.stop_line is not None:
            raise _StopForward()

    # -- serving requests ------------------------------------------------------------------

    def _serve(self, holder: Any, phase: str | None, key: int | None) -> None:
        """Resume every invoke whose request this moment answers, until none can go on."""
        __tracebackhide__ = True
        self.serving = (phase, key) if phase is not None else None
        try:
            self._serve_all(holder, phase, key)
        finally:
            self.serving = None

    def _serve_all(self, holder: Any, phase: str | None, key: int | None) -> None:
        __tracebackhide__ = True
        progressed = True
        while progressed:
            progressed = False
            for inv in self.invokes:
                while inv.pending is not None:
                    try:
                        answer = self._answer(inv, inv.pending, holder, phase, key)
                    except InterventionError as exc:  # raise it where the cell asked
                        inv.pending = self._resume(inv, None, exc.at_line(inv.pending.line))
                        progressed = True
                        continue
                    if answer is _WAIT:
                        break
                    inv.last = inv.pending if inv.pending.kind == "site" else inv.last
                    inv.pending = self._resume(inv, answer)
                    progressed = True

    def _answer(self, inv: Invoke, req: Request, holder: Any, phase, key) -> Any:
        """The value that resumes ``req`` now, or ``_WAIT`` when it must keep waiting."""
        if req.kind == "names":
            return None if set(req.names) <= self.bound_names else _WAIT
        if req.kind == "model_output":
            return self._answer_model_output(inv, holder, phase)
        if holder is None or req.phase != phase or id(req.envoy.module) != key or req.step != self.step:
            return _WAIT
        return holder.serve(self, inv, req)

    def _answer_model_output(self, inv: Invoke, holder: Any, phase) -> Any:
        if self.generate is None and isinstance(holder, _Output) and holder.is_root:
            out = values.take_rows(holder.value, inv.rows, self.batch.size)
            return getattr(out, "logits", out)
        if self.finished and self.generate is not None:
            return values.take_rows(self.final_output, inv.rows, self.batch.size)
        return _WAIT

    def _resume(self, inv: Invoke, value: Any, error: BaseException | None = None) -> Request | None:
        __tracebackhide__ = True
        result = inv.glet.throw(error) if error is not None else inv.glet.switch(value)
        return None if result is _DONE else result

    def record(self, req: Request, value: Any) -> None:
        if req.site is not None:
            req.site.visits.append(Visit(self.step, values.shape_of(value), values.dtype_of(value)))

    # -- skip ------------------------------------------------------------------------------

    def _ensure_skippable(self, module: nn.Module) -> None:
        if any(m is module for m, _, _ in self.restore_forward):
            return
        had = "forward" in module.__dict__
        self.restore_forward.append((module, had, module.__dict__.get("forward")))
        original = module.forward
        key = id(module)

        def forward(*args, **kwargs):
            skips = self.skips.pop(key, None)
            if not skips:
                return original(*args, **kwargs)
            batch = self.batch.size
            rows = sorted((s[0].start, s[0].stop) for s in skips)
            if _covers_all(rows, batch):
                return _join_skips(skips, batch)
            return self._apply_skips(skips, original(*args, **kwargs))

        module.forward = forward

    def _apply_skips(self, skips: list[tuple[slice, Any, Request]], output: Any) -> Any:
        for rows, value, req in skips:
            output = values.put_rows(output, rows, self.batch.size, value, req.label)
        return output

    # -- the run ---------------------------------------------------------------------------

    def start_invokes(self, codes: list[Any], batch: Batch) -> None:
        self.batch = batch
        for code, rows in zip(codes, batch.rows):
            inv = Invoke(len(self.invokes), rows)
            inv.glet = greenlet.greenlet(_invoke_runner(code, self.ns), parent=self.main)
            self.invokes.append(inv)
        for inv in self.invokes:
            inv.pending = self._resume(inv, None)
        self._serve(None, None, None)

    def forward(self) -> Any:
        kwargs = dict(self.batch.kwargs)
        self.running = True
        try:
            if self.generate is None:
                return self.root(**kwargs)
            kwargs.pop("position_ids", None)
            pad = self.model._pad_id()
            return self.root.generate(**kwargs, max_new_tokens=self.generate, do_sample=False,
                                      pad_token_id=pad)
        finally:
            self.running = False

    def finish(self, output: Any) -> None:
        """After the forward: answer what can still be answered, fail what cannot."""
        __tracebackhide__ = True
        self.finished = True
        if self.generate is not None:
            self.final_output = output
        else:
            self.final_output = getattr(output, "logits", output)
        self._serve(None, None, None)
        for inv in self.invokes:
            tries = 0
            while inv.pending is not None:
                tries += 1
                error = self._unreached(inv.pending) if tries < 4 else greenlet.GreenletExit()
                inv.pending = self._resume(inv, None, error)

    def _unreached(self, req: Request) -> InterventionError:
        if req.kind == "names":
            return InterventionError(
                f"this line waits for {req.label} from another invoke, which binds it only "
                f"later in the forward (or never): one forward cannot go back", line=req.line)
        steps = max(self.step + 1, 0)
        if self.stop_line is not None:
            reason = f"tracer.stop() (line {self.stop_line}) ended the forward first"
        elif req.kind == "model_output":
            reason = "the forward ended without producing it"
        elif req.step >= steps:
            reason = (f"the run had {steps} step(s) (0..{steps - 1}); this asks for step "
                      f"{req.step}")
        elif (req.phase, id(req.envoy.module)) not in self.fired:
            reason = f"model.{req.envoy.path} was never called in this forward"
        else:
            reason = ("that module had already run when this line asked for it: one forward "
                      "cannot go back")
        return SiteError(f"`{req.label}` was never reached: {reason}", line=req.line)

    def cleanup(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module, had, previous in self.restore_forward:
            if had:
                module.forward = previous
            else:
                module.__dict__.pop("forward", None)
        self.restore_forward.clear()
        for inv in self.invokes:
            if inv.glet is not None and not inv.glet.dead:
                try:
                    inv.glet.throw(greenlet.GreenletExit())
                except BaseException:  # the greenlet is being discarded either way
                    pass
            inv.glet = None
            inv.pending = None


class _Inputs:
    """The (args, kwargs) of a module call, as a pre-hook sees them."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs, self.changed = args, kwargs, False

    def first(self) -> tuple[str | int, Any]:
        if self.args:
            return 0, self.args[0]
        if self.kwargs:
            name = next(iter(self.kwargs))
            return name, self.kwargs[name]
        raise SiteError("this module was called without arguments, so it has no `.input`")

    def set_first(self, key: str | int, value: Any) -> None:
        if key == 0:
            self.args = (value,) + tuple(self.args[1:])
        else:
            self.kwargs = {**self.kwargs, key: value}
        self.changed = True

    def serve(self, bridge: Bridge, inv: Invoke, req: Request) -> Any:
        batch, rows = bridge.batch.size, inv.rows
        if req.attr == "skip":
            bridge.skips.setdefault(id(req.envoy.module), []).append((rows, req.payload, req))
            bridge.record(req, req.payload)
            return None
        if req.attr == "inputs":
            current = (self.args, self.kwargs)
            if req.access == "read":
                value = values.take_rows(current, rows, batch)
                bridge.record(req, value[0])
                return value
            if req.access == "write":
                args, kwargs = _check_inputs_pair(req.payload, req.label)
                new_args, new_kwargs = values.put_rows(current, rows, batch, (args, kwargs),
                                                       req.label)
                self.args, self.kwargs, self.changed = tuple(new_args), dict(new_kwargs), True
                return None
            raise SiteError(f"`{req.label}` is an (args, kwargs) pair: edit `.input`, or "
                            f"assign a new pair to `.inputs`", line=req.line)
        key, current = self.first()
        return _serve_value(bridge, inv, req, current, lambda v: self.set_first(key, v))


class _Output:
    """A module's output, as a forward hook sees it."""

    def __init__(self, value: Any, is_root: bool) -> None:
        self.value, self.is_root, self.changed = value, is_root, False

    def set(self, value: Any) -> None:
        self.value, self.changed = value, True

    def serve(self, bridge: Bridge, inv: Invoke, req: Request) -> Any:
        return _serve_value(bridge, inv, req, self.value, self.set)


def _serve_value(bridge: Bridge, inv: Invoke, req: Request, current: Any, setter) -> Any:
    batch, rows = bridge.batch.size, inv.rows
    if req.access == "read":
        value = values.take_rows(current, rows, batch)
        bridge.record(req, value)
        return value
    if req.access == "write":
        setter(values.put_rows(current, rows, batch, req.payload, req.label))
        bridge.record(req, req.payload)
        return None
    if req.access == "augment":
        op, operand = req.payload
        mine = values.take_rows(current, rows, batch)
        result = getattr(operator, op)(mine, operand)
        if result is not mine:
            setter(values.put_rows(current, rows, batch, result, req.label))
        bridge.record(req, result)
        return None
    index, value = req.payload
    view = values.take_rows(current, rows, batch)
    values.set_index(view, index, value, req.label)
    bridge.record(req, view)
    return None


def _check_inputs_pair(value: Any, label: str) -> tuple[tuple, dict]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not isinstance(value[0], (tuple, list)) or not isinstance(value[1], dict)):
        raise SiteError(f"`{label}` takes an (args, kwargs) pair; got {values.describe(value)}")
    return tuple(value[0]), dict(value[1])


def _covers_all(rows: list[tuple[int, int]], batch: int) -> bool:
    position = 0
    for start, stop in rows:
        if start != position:
            return False
        position = stop
    return position == batch


def _join_skips(skips: list[tuple[slice, Any, Request]], batch: int) -> Any:
    ordered = sorted(skips, key=lambda s: s[0].start)
    if len(ordered) == 1:
        return ordered[0][1]
    parts = [value for _, value, _ in ordered]
    if not all(isinstance(p, torch.Tensor) for p in parts):
        raise SiteError(f"`{ordered[0][2].label}`: when several invokes skip the same module, "
                        "each skip value must be a tensor")
    return torch.cat(parts, dim=0)


def _invoke_runner(code: Any, ns: dict):
    def run(*_: Any) -> Any:
        exec(code, ns)
        return _DONE

    return run


class Tracer:
    """``tracer`` inside a cell: ``invoke``, ``steps``, ``stop`` and ``output``."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    def invoke(self, x: Any):  # pragma: no cover - the compiler turns invoke blocks into code
        raise InterventionError("`tracer.invoke` must be a `with` block at the top level")

    def steps(self, n: int | None = None) -> Iterator[int]:
        """Iterate generation steps; sites in the loop body refer to that step.

        >>> for step in tracer.steps():                       # doctest: +SKIP
        ...     logits = model.lm_head.output
        """
        bridge = self._bridge
        inv = bridge._current_invoke(what="tracer.steps()")
        total = bridge.generate if bridge.generate is not None else 1
        for step in range(total if n is None else min(n, total)):
            inv.step = step
            yield step

    def stop(self) -> None:
        """End the forward after the current module; sites after it are not reached."""
        bridge = self._bridge
        inv = bridge._current_invoke(what="tracer.stop()")
        if not bridge.running:
            raise InterventionError("tracer.stop() was called before the forward started")
        bridge.stop_line = inv.last.line if inv.last is not None and inv.last.line else 0

    @property
    def output(self) -> Any:
        """Logits for a trace, token ids for a generation."""
        return self._bridge.model_output(None)

    def __repr__(self) -> str:
        return f"<tracer: {len(self._bridge.invokes)} invoke(s)>"


def call_module(envoy: Envoy, args: tuple, kwargs: dict) -> Any:
    """Run a module ad hoc (no trace hooks fire), moving tensors to its device."""
    module = envoy.module
    device = _module_device(module)
    if device is not None:
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    bridge = _ACTIVE
    if bridge is None:
        return module(*args, **kwargs)
    bridge.adhoc += 1
    try:
        return module(*args, **kwargs)
    finally:
        bridge.adhoc -= 1


def _module_device(module: nn.Module) -> torch.device | None:
    for param in module.parameters():
        return param.device
    return None


# -- the whole run --------------------------------------------------------------------------

@contextmanager
def _active(bridge: Bridge):
    global _ACTIVE
    if _ACTIVE is not None:
        raise InterventionError("a trace is already running: traces cannot be nested")
    _ACTIVE = bridge
    try:
        yield
    finally:
        _ACTIVE = None


def run_cell(model: Model, cell: CompiledCell, ns: dict, *, line_input: Any = _NO_INPUT,
             generate: int | None = None, grad: bool = False) -> Outcome:
    """Run ``cell`` in namespace ``ns`` against one forward of ``model``.

    ``ns`` gets the names the cell binds; the caller decides whether to publish them.
    Hooks, patched forwards and greenlets are gone when this returns or raises.
    """
    __tracebackhide__ = True
    graph = cell.fresh_graph()
    plan = validate(cell, model, graph)
    bridge = Bridge(model, cell, graph, plan, ns, generate)
    ns[BRIDGE], ns[TRACER] = bridge, bridge.tracer
    start = time.perf_counter()
    grads = _param_grads(model.module) if grad else None
    with _active(bridge), torch.set_grad_enabled(grad):
        try:
            _run(bridge, cell, ns, line_input)
        finally:
            bridge.cleanup()
            if grads is not None:
                _restore_param_grads(grads)
    return Outcome(graph, bridge.final_output, bridge.batch, bridge.step + 1,
                   time.perf_counter() - start, bridge.stop_line)


def _run(bridge: Bridge, cell: CompiledCell, ns: dict, line_input: Any) -> None:
    __tracebackhide__ = True
    if cell.before is not None:
        exec(cell.before, ns)
    if line_input is not _NO_INPUT:
        inputs = [line_input]
    else:
        inputs = [eval(inv.input_code, ns) for inv in cell.invokes]
    batch = bridge.model.prepare(inputs, line=cell.invokes[0].line if line_input is _NO_INPUT
                                 else None)
    bridge.start_invokes([inv.body for inv in cell.invokes], batch)
    bridge.install_hooks()
    try:
        output = bridge.forward()
    except _StopForward:
        output = None
    bridge.finish(output)
    if cell.after is not None:
        exec(cell.after, ns)


def _param_grads(module: nn.Module) -> list[tuple[torch.Tensor, bool]]:
    return [(p, p.grad is None) for p in module.parameters()]


def _restore_param_grads(grads: list[tuple[torch.Tensor, bool]]) -> None:
    for param, was_none in grads:
        if was_none:
            param.grad = None
