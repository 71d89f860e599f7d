"""The scheduler: each invoke's code on its own greenlet, the requests it makes, and serving
them from the hooks of the running forward.

An invoke's code switches to the main greenlet (the one running the forward) with a
:class:`Request`; when a hook fires, :meth:`Scheduler.serve` resumes every invoke whose
request that moment answers, reads before writes, until none can go on. After the forward,
:meth:`Scheduler.finish` fails what was never reached, with the reason.
"""

from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import greenlet
import torch

from ipy_intervene.compiler.graph import InterventionGraph, Site, Visit
from ipy_intervene.errors import InterventionError, SiteError
from ipy_intervene.model.batch import Batch
from ipy_intervene.model.envoys import Envoy
from ipy_intervene.runtime import values
from ipy_intervene.runtime.access import Output, ReadLedger, copy_value, serve_model_output

PRE, OUT = "pre", "out"
DONE = object()    # what an invoke's greenlet returns when its code has finished
#: Modules whose output the model was seen to change in place after a read: later reads of
#: them are served as copies (``Scheduler.check_served``).
CHANGED_IN_PLACE: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


@dataclass
class Request:
    """What an invoke's code is waiting for."""

    kind: str                       # site | names | model_output | step
    envoy: Envoy | None = None
    attr: str = ""                  # output | input | inputs | skip
    access: str = "read"            # read | arrive | write | edit | augment | skip
    step: int = 0
    site: Site | None = None
    payload: Any = None
    names: tuple[str, ...] = ()
    line: int | None = None

    @property
    def phase(self) -> str:
        return OUT if self.attr == "output" else PRE

    @property
    def key(self) -> tuple[str, int]:
        return self.phase, id(self.envoy.module)

    @property
    def label(self) -> str:
        if self.kind == "names":
            return ", ".join(f"`{n}`" for n in self.names)
        if self.kind == "model_output":
            return "tracer.output"
        return f"{self.envoy.path or 'model'}.{self.attr}"


@dataclass
class Invoke:
    index: int                      # position in the batch's invokes
    code: int                       # which invoke block of the cell (graph region)
    rows: slice
    glet: greenlet.greenlet | None = None
    pending: Request | None = None
    step: int = 0
    last: Request | None = None     # the last site request answered
    waited: Request | None = None   # the last request answered, when it was a names wait


class Scheduler:
    """Invokes, their pending requests and what the forward has done so far."""

    def __init__(self, graph: InterventionGraph, generate: int | None) -> None:
        self.graph, self.generate = graph, generate
        self.invokes: list[Invoke] = []
        self.main = greenlet.getcurrent()
        self.batch: Batch | None = None
        self.step = -1
        self.running = self.finished = False
        self.final_output: Any = None
        self.loss: Any = None                           # the model's loss, given labels=
        self.bound_names: set[str] = set()
        self.fired: dict[tuple[str, int], int] = {}     # (phase, module id) -> last step
        self.retained: dict[tuple[str, int], Any] = {}  # this step's holders of hooked modules
        self.ledger = ReadLedger()                      # this step's values served to reads
        self.serving: tuple[str, int] | None = None     # the hook whose requests are served now
        self.skips: dict[int, list] = {}
        self.stop_line: int | None = None
        self.enter: Callable[[Invoke], None] | None = None  # called before an invoke resumes
        self.served: list[list[Any]] = []  # [tensor, its version after the cell's turn, req]
        self.changed: list[Any] = []       # reads whose tensor the model changed afterwards
        self.copied: set[int] = {id(m) for m in CHANGED_IN_PLACE}  # reads served as copies

    # -- invokes ---------------------------------------------------------------------------

    def start(self, bodies: list[tuple[int, Callable[[], Any]]], batch: Batch) -> None:
        """Start one greenlet per (invoke block, body) and run each to its first request."""
        self.batch = batch
        for (code, body), rows in zip(bodies, batch.rows):
            inv = Invoke(len(self.invokes), code, rows)
            inv.glet = greenlet.greenlet(_runner(body), parent=self.main)
            inv.glet.gr_context = contextvars.copy_context()  # sees the running trace
            self.invokes.append(inv)
        for inv in self.invokes:
            inv.pending = self._resume(inv, None)
        self.serve(None, None, None)

    def current(self, required: bool = True, what: str = "a module site") -> Invoke | None:
        """The invoke whose code is running now (None before/after the forward)."""
        here = greenlet.getcurrent()
        for inv in self.invokes:
            if inv.glet is here:
                return inv
        if required:
            when = "after the forward has finished" if self.finished else "before the forward"
            raise SiteError(f"{what} can only be used inside an invoke; this code runs {when}")
        return None

    def wait(self, request: Request) -> Any:
        """Suspend the calling invoke until ``request`` is answered."""
        __tracebackhide__ = True
        return self.main.switch(request)

    def kill(self) -> None:
        """End every invoke's greenlet (after a failure or when the run is over)."""
        for inv in self.invokes:
            glet, inv.glet, inv.pending = inv.glet, None, None
            if glet is not None and not glet.dead:
                try:
                    glet.throw(greenlet.GreenletExit())
                except greenlet.GreenletExit:
                    pass

    # -- sites that already ran --------------------------------------------------------------

    def already_ran(self, req: Request) -> bool:
        if req.step < self.step:
            raise SiteError(f"`{req.label}` at step {req.step} has already passed: generation is "
                            f"at step {self.step}", line=req.line)
        return self.running and req.key != self.serving and self.fired.get(req.key) == req.step

    def past_value(self, inv: Invoke, req: Request) -> Any:
        """A read of a site that already ran this step gets the value that flowed on."""
        if req.access == "read" and req.attr != "skip" and req.key in self.retained:
            return self.retained[req.key].serve(self, inv, req)
        before = ""
        if inv.waited is not None:
            where = _binding_lines(self.graph, inv.waited.names, inv.waited.line)
            before = (f" after waiting for {inv.waited.label}, which another invoke binds only "
                      f"later in the forward{where}")
        elif inv.last is not None and inv.last.kind == "site":
            where = f" (line {inv.last.line})" if inv.last.line else ""
            before = f" after `{inv.last.label}`{where}, which the model runs later"
        change = "change" if req.access != "read" else "read"
        cells = ("two cells: one trace that gets the later value, then a second trace that "
                 "uses it (or ii.cache(...) first, then the trace)")
        advice = (f"All invokes of a cell share one forward, which runs the earlier site "
                  f"first, so a value from a later site cannot change an earlier one, even in "
                  f"another invoke. Use {cells}"
                  if inv.waited is not None else
                  f"Use the sites in the order the model runs them, or split the work over "
                  f"{cells}")
        raise SiteError(f"`{req.label}` has already run in this forward when this line asks to "
                        f"{change} it{before}: one forward cannot go back. {advice}",
                        line=req.line)

    def rows_to_split(self) -> list[slice] | None:
        """Each invoke's rows, when a hooked value must be split into parts (autograd on and
        several invokes: see :class:`~ipy_intervene.runtime.access.Parts`), else None."""
        if len(self.invokes) > 1 and torch.is_grad_enabled():
            return [inv.rows for inv in self.invokes]
        return None

    def wanted(self, phase: str, key: int) -> bool:
        return any(inv.pending is not None and (
            inv.pending.kind == "site" and inv.pending.step == self.step
            and inv.pending.key == (phase, key)
            or inv.pending.kind == "step" and inv.pending.step <= self.step)
            for inv in self.invokes)

    def wants_logits(self) -> bool:
        return self.generate is None and any(
            inv.pending is not None and inv.pending.kind == "model_output" for inv in self.invokes)

    def new_step(self) -> None:
        self.step += 1
        self.retained.clear()
        self.ledger.clear()
        self.served.clear()      # checked at this hook already; a new step makes new values

    def record(self, req: Request, value: Any) -> None:
        if req.site is not None:
            req.site.visits.append(Visit(self.step, values.shape_of(value), values.dtype_of(value)))

    # -- serving ---------------------------------------------------------------------------

    def serve(self, holder: Any, phase: str | None, key: int | None) -> None:
        """Resume every invoke this moment answers (reads first) until none can go on."""
        __tracebackhide__ = True
        self.serving = (phase, key) if phase is not None else None
        try:
            while (inv := self._next(holder, phase, key)) is not None:
                self._serve_one(inv, holder)
        finally:
            self.serving = None

    def _next(self, holder: Any, phase: str | None, key: int | None) -> Invoke | None:
        ready = [inv for inv in self.invokes
                 if inv.pending is not None and self._ready(inv.pending, holder, phase, key)]
        reads = (inv for inv in ready if inv.pending.kind == "site" and inv.pending.access == "read")
        return next(reads, ready[0] if ready else None)

    def _ready(self, req: Request, holder: Any, phase: str | None, key: int | None) -> bool:
        if req.kind == "names":
            return set(req.names) <= self.bound_names
        if req.kind == "step":   # tracer.steps(): the step has begun, or the run is over
            return self.step >= req.step or self.finished
        if req.kind == "model_output":
            if self.generate is None:
                return isinstance(holder, Output) and holder.is_root
            return self.finished
        return holder is not None and req.key == (phase, key) and req.step == self.step

    def _serve_one(self, inv: Invoke, holder: Any) -> None:
        __tracebackhide__ = True
        req = inv.pending
        try:
            answer = self._answer(inv, req, holder)
        except InterventionError as exc:  # raised where the cell asked
            inv.pending = self._resume(inv, None, exc.at_line(req.line))
            return
        if req.kind == "site" and req.access == "read":
            if id(req.envoy.module) in self.copied:   # the model changes this value later
                answer = copy_value(answer)
            elif isinstance(answer, torch.Tensor) and not answer.is_inference():
                self.served.append([answer, answer._version, req])
        inv.last = req if req.kind == "site" else inv.last
        inv.waited = req if req.kind == "names" else None
        inv.pending = self._resume(inv, answer)

    def _answer(self, inv: Invoke, req: Request, holder: Any) -> Any:
        if req.kind == "names":
            return None
        if req.kind == "step":
            return self.step >= req.step
        if req.kind == "model_output":
            source = holder.value if self.generate is None else self.final_output
            out = serve_model_output(self, inv, source)
            return getattr(out, "logits", out)
        return holder.serve(self, inv, req)

    def _resume(self, inv: Invoke, value: Any, error: BaseException | None = None) -> Request | None:
        __tracebackhide__ = True
        if self.enter is not None:
            self.enter(inv)
        result = inv.glet.throw(error) if error is not None else inv.glet.switch(value)
        return None if result is DONE or inv.glet.dead else result  # dead: GreenletExit

    # -- values the model changes in place after a read ------------------------------------

    def settled(self) -> None:
        """After a hook's turns and their writes: what the cell holds now is what it read."""
        for entry in self.served:
            entry[1] = entry[0]._version

    def check_served(self) -> None:
        """Note each value the cell read that the model has since changed in place (a
        module's output a later line of the model adds into, like parallel Falcon's MLP
        output before the table knew it): from now on its reads get a copy."""
        if any(tensor._version != version for tensor, version, _ in self.served):
            changed = [req for t, version, req in self.served if t._version != version]
            self.changed += changed
            CHANGED_IN_PLACE.update(req.envoy.module for req in changed)
            self.served = [entry for entry in self.served if entry[0]._version == entry[1]]

    def check_changed(self) -> None:
        """The cell fails when the model changed in place a value it had read: the name
        holding it, or anything computed from it after that moment, would be wrong. A
        second run gets copies of that site (``CHANGED_IN_PLACE``)."""
        if self.changed:
            req = self.changed[0]
            raise SiteError(f"the model changed `{req.label}` in place after this line read "
                            "it, so what the cell holds (and anything computed from it "
                            "afterwards) is no longer the site's value; nothing is published. "
                            "Reads of this site now get a copy: run the cell again",
                            line=req.line)

    # -- after the forward -------------------------------------------------------------------

    def finish(self, output: Any) -> None:
        """Answer what can still be answered, then fail what cannot, with the reason."""
        __tracebackhide__ = True
        self.finished = True
        self.final_output = output if self.generate is not None else getattr(output, "logits",
                                                                             output)
        self.loss = getattr(output, "loss", None) if self.generate is None else None
        self.check_served()
        self.serve(None, None, None)
        for inv in self.invokes:
            tries = 0
            while inv.pending is not None:
                tries += 1
                error = self.unreached(inv.pending)
                if tries > 3:   # the cell catches the error and asks again: stop it, loudly
                    self._resume(inv, None, greenlet.GreenletExit())
                    raise InterventionError(f"{error.detail} (the cell caught this error and "
                                            "asked again; stopped after 3 times)",
                                            line=error.line)
                inv.pending = self._resume(inv, None, error)

    def unreached(self, req: Request) -> InterventionError:
        if req.kind == "names":
            where = _binding_lines(self.graph, req.names, req.line)
            return InterventionError(
                f"this line waits for {req.label} from another invoke, which binds it only "
                f"later in the forward (or never){where}: one forward cannot go back. Bind it "
                "at an earlier site, or use it at a later one", line=req.line)
        steps = max(self.step + 1, 0)
        if self.stop_line is not None:
            reason = f"tracer.stop() (line {self.stop_line}) ended the forward first"
        elif req.kind == "model_output":
            reason = "the forward ended without producing it"
        elif req.step >= steps and self.generate is not None and steps < self.generate:
            reason = (f"generation stopped at end-of-text, which the model chose at step "
                      f"{steps - 1} of the {self.generate} asked for. To run all "
                      f"{self.generate} steps, add --ignore-eos (`ii.trace(..., "
                      "ignore_eos=True)`)")
        elif req.step >= steps:
            reason = (f"the run had {steps} step(s) (0..{steps - 1}); this asks for step "
                      f"{req.step}")
        elif req.key not in self.fired:
            reason = f"model.{req.envoy.path} was never called in this forward"
        else:
            reason = ("that module had already run when this line asked for it: one forward "
                      "cannot go back")
        return SiteError(f"`{req.label}` was never reached: {reason}", line=req.line)


def _binding_lines(graph: InterventionGraph, names: tuple[str, ...], line: int | None) -> str:
    lines = sorted({st.line for st in graph.statements if set(st.defs) & set(names)} - {line})
    return f" (line {', '.join(map(str, lines))})" if lines else ""


def _runner(body: Callable[[], Any]) -> Callable[..., Any]:
    def run(*_: Any) -> Any:
        body()
        return DONE

    return run

