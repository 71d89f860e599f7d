"""The run itself: one forward (or ``generate``) of the model with the cell's invokes
interleaved, inside one hook session.

>>> outcome = run_cell(model, cell, graph, plan, ns, line_input="When Mary and John")  # doctest: +SKIP
"""

from __future__ import annotations

import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from types import FunctionType
from typing import Any, Callable, Iterator

from torch import nn

from ipy_intervene.arch import attention, moe
from ipy_intervene.arch.families import changed_in_place
from ipy_intervene.compiler.compile import CompiledCell, InvokeCode
from ipy_intervene.compiler.graph import InterventionGraph, Visit
from ipy_intervene.compiler.validate import HookPlan, check_called
from ipy_intervene.errors import InterventionError, SiteError, cell_line
from ipy_intervene.infra import active
from ipy_intervene.infra.hooks import HookSession
from ipy_intervene.model.batch import Batch
from ipy_intervene.model.envoys import Envoy, Model
from ipy_intervene.runtime import facade, values
from ipy_intervene.runtime.generation import GenerateOptions
from ipy_intervene.runtime.hooks import StopForward, TraceHooks
from ipy_intervene.runtime.scheduler import OUT, Invoke, Request, Scheduler
from ipy_intervene.runtime.taken import changed, fingerprint

NO_INPUT = object()  # no INPUT on the magic line


@dataclass
class Outcome:
    """What a run produced (the names it bound are in the namespace)."""

    graph: InterventionGraph
    output: Any
    batch: Batch
    steps: int
    seconds: float
    stopped_at: int | None = None
    loss: Any = None                   # the model's loss, when the INPUT gave labels=


class TraceRun:
    """One running trace: what ``__ii__`` and ``tracer`` talk to."""

    def __init__(self, model: Model, cell: CompiledCell, graph: InterventionGraph, ns: dict,
                 generate: int | None, session: HookSession, ignore_eos: bool = False,
                 options: GenerateOptions | None = None) -> None:
        self.model, self.cell, self.graph, self.ns = model, cell, graph, ns
        self.filename = cell.filename
        self.generate, self.ignore_eos = generate, ignore_eos
        self.options = options or GenerateOptions()
        self.sched = Scheduler(graph, generate)
        self.hooks = TraceHooks(session, self.sched, model.module)
        self.planned: list[tuple[int, Any, dict[str, Any]]] = []  # (block, INPUT, captured)
        self.appended: dict[int, tuple[list, int, list]] = {}  # list id -> (list, base, items)
        # len() of such lists: (invoke, list, the length, the invoke's own items then, line)
        self.lengths: list[tuple[int, list, int, int, int]] = []
        self.taken: list[tuple[str, Any, tuple, int]] = []  # what invokes took, fingerprinted
        self.varying: list[dict[str, Any]] = []  # per invoke: its values of cell.varying

    # -- requests from the cell (through the facade) -----------------------------------------

    def ask(self, envoy: Any, attr: str, access: str, sid: int | None, payload: Any) -> Any:
        __tracebackhide__ = True
        sched = self.sched
        inv = sched.current()
        envoy = self._envoy(envoy, attr)
        site = self.graph.site(sid)
        if site is None:
            site = self.graph.add_dynamic_site(line=0, path=envoy.path, attr=attr, access=access,
                                               invoke=inv.code)
        request = Request("site", envoy, attr, access, inv.step, site, payload, line=site.line)
        if sched.already_ran(request):
            return sched.past_value(inv, request)
        self.hooks.ensure(envoy.module, request.phase)
        if attr == "skip":
            self.hooks.ensure(envoy.module, OUT)  # applies the skip if the module ran anyway
        return sched.wait(request)

    def _envoy(self, envoy: Any, attr: str) -> Envoy:
        if isinstance(envoy, nn.Module):
            envoy = self.model.envoy_for(envoy) or envoy
        if not isinstance(envoy, Envoy):
            raise SiteError(f"`.{attr}` needs a module of the model; got {type(envoy).__name__}")
        if not self.model.owns(envoy.module):
            raise SiteError(f"`.{attr}` of a module that is not part of the model this cell "
                            f"traces ({type(self.model.module).__name__}): use the traced "
                            "model's modules, or trace the other model")
        check_called(envoy, attr)
        return envoy

    def call(self, target: Any, sid: int | None, args: tuple, kwargs: dict) -> Any:
        """``model.lm_head(x)`` in a cell: the module run ad hoc (no hooks of ours act)."""
        if isinstance(target, nn.Module):
            target = self.model.envoy_for(target) or target
        result = target(*args, **kwargs)
        site = self.graph.site(sid)
        if isinstance(target, Envoy) and site is not None:
            site.visits.append(Visit(max(self.sched.step, 0), values.shape_of(result),
                                     values.dtype_of(result)))
        return result

    def model_output(self, sid: int | None) -> Any:
        __tracebackhide__ = True
        sched = self.sched
        inv = sched.current(required=False)
        if inv is None:
            if not sched.finished:
                raise InterventionError("tracer.output is only available inside an invoke or "
                                        "after the forward, not before it")
            return sched.final_output
        return sched.wait(Request("model_output", step=inv.step, site=self.graph.site(sid)))

    def add_invoke(self, code: int, input_: Any, names: dict[str, Any]) -> None:
        """Register an invoke of block ``code``; it keeps the values its names have now."""
        if self.sched.batch is not None:
            raise InterventionError("invokes are added before the forward; this one comes too late")
        params = self.cell.invokes[code].params
        taken = {p: names[p] for p in params if p in names}
        self.planned.append((code, input_, taken))
        self.varying.append({n: names[n] for n in self.cell.varying if n in names})
        for name, value in taken.items():
            seen = fingerprint(value)
            if seen is not None:
                self.taken.append((name, value, seen, code))

    def check_taken(self) -> None:
        """A value an invoke took, changed in place by a later statement of the set-up
        (``vec *= 2``, ``cfg["coef"] = c``), would reach that invoke changed: the set-up
        runs before the forward."""
        for name, value, seen, code in self.taken:
            if changed(seen, value):
                raise InterventionError(
                    f"`{name}` was changed in place by the set-up after the invoke at line "
                    f"{self.cell.invokes[code].line} took it (statements between invokes run "
                    f"before the forward, so that invoke would see the change too). Give each "
                    f"invoke its own value: a new object (`{name} = {name} * 2`, not "
                    f"`{name} *= 2`; a new dict), or a loop variable",
                    line=self.cell.invokes[code].line)

    def bound(self, names: tuple[str, ...]) -> None:
        """The invoke that runs now has bound ``names`` (another invoke may wait for them)."""
        self.sched.bound_names.update(names)

    def enter(self, inv: Invoke) -> None:
        """Before an invoke's code runs: the set-up names that differ between invokes hold
        its values (for functions of the cell that read them). Installed only for cells
        that have such names."""
        self.ns.update(self.varying[inv.index])

    def append_in_order(self, items: list, how: str, value: Any) -> None:
        """``items.append(value)`` now (the invoke may read ``items[-1]`` next), noting which
        invoke added what, so that :meth:`order_appends` puts the items in invoke order."""
        inv = self.sched.current(required=False)
        start = len(items)
        getattr(items, how)(value)
        if inv is not None:
            _, base, added = self.appended.setdefault(id(items), (items, start, []))
            added.extend((inv.index, i, item) for i, item in enumerate(items[start:], len(added)))

    def length_in_order(self, items: list, line: int) -> int:
        """``len(items)`` now, noted with what the invoke had added to it (see
        :meth:`order_appends`)."""
        inv = self.sched.current(required=False)
        if inv is not None:
            entry = self.appended.get(id(items))
            own = sum(j == inv.index for j, _, _ in entry[2]) if entry else 0
            self.lengths.append((inv.index, items, len(items), own, line))
        return len(items)

    def order_appends(self) -> None:
        """After the forward: each list several invokes filled holds their items in invoke
        order (what each invoke added, in its own order), when nothing else changed it. A
        length an invoke took of it during the forward (``len(outs) - 1``) that is not the
        one it has in invoke order is an error: an index from it would point elsewhere."""
        for items, base, added in self.appended.values():
            tail = items[base:]
            if len(tail) == len(added) and all(a is b for a, (_, _, b) in zip(tail, added)):
                _check_lengths(self.lengths, items, base, added)
                items[base:] = [item for _, _, item in sorted(added, key=lambda t: t[:2])]

    def wait_for(self, names: tuple[str, ...], line: int) -> None:
        __tracebackhide__ = True
        inv = self.sched.current(required=False)
        if inv is not None and not set(names) <= self.sched.bound_names:
            self.sched.wait(Request("names", names=names, line=line))

    def count_branch(self, region: int, taken: bool) -> None:
        r = self.graph.regions[region]
        r.entered += 1
        r.taken += taken

    def count_iteration(self, region: int) -> None:
        self.graph.regions[region].entered += 1

    def steps(self, n: int | None) -> Iterator[int]:
        """The steps the run takes: up to ``n`` (default: all asked for), fewer when every
        prompt has stopped at end-of-text (the loop just ends)."""
        sched = self.sched
        inv = sched.current(what="tracer.steps()")
        total = self.generate if self.generate is not None else 1
        for step in range(total if n is None else min(n, total)):
            if step > max(sched.step, 0) and not sched.wait(Request("step", step=step)):
                return  # generation ended before this step
            inv.step = step
            yield step

    def stop(self, line: int | None) -> None:
        """End the forward after the current module (``line``: the cell's ``tracer.stop()``;
        None when called another way: the line of the last site answered)."""
        sched = self.sched
        inv = sched.current(what="tracer.stop()")
        if not sched.running:
            raise InterventionError("tracer.stop() was called before the forward started")
        last = inv.last.line if inv.last is not None and inv.last.line else 0
        sched.stop_line = line if line is not None else last

    # -- the forward -----------------------------------------------------------------------

    def forward(self, batch: Batch) -> Any:
        root, kwargs, args = self.model.module, dict(batch.kwargs), batch.args
        self.sched.running = True
        try:
            if self.generate is None:
                return root(*args, **kwargs)
            kwargs.pop("position_ids", None)
            if self.ignore_eos:  # end-of-text is forbidden until the last step
                kwargs["min_new_tokens"] = self.generate
            options = {"do_sample": False, **self.options.kwargs}
            with self.options.seeded(self.model.device):
                return root.generate(*args, **kwargs, max_new_tokens=self.generate,
                                     pad_token_id=self.model.pad_id, **options)
        except StopForward:
            return None
        finally:
            self.sched.running = False


def run_cell(model: Model, cell: CompiledCell, graph: InterventionGraph, plan: HookPlan,
             ns: dict, *,
             line_input: Any = NO_INPUT, generate: int | None = None,
             grad: bool = False, fake: bool = False, ignore_eos: bool = False,
             options: GenerateOptions | None = None) -> Outcome:
    """Run a validated ``cell`` in namespace ``ns`` against one forward of ``model``.

    Names the cell binds go straight into ``ns`` (the caller undoes them if this raises).
    Hooks, replaced forwards, ``.grad`` and grad mode are as before when this returns or
    raises, whenever a Ctrl-C lands. ``fake``: a dry run on fake tensors, during which the
    model's other hooks (yours) are set aside.
    """
    __tracebackhide__ = True
    facade.install()
    start = time.perf_counter()
    with HookSession(exclusive=True) as session:
        session.grad_mode(grad)
        if fake:
            session.set_aside_hooks(model.module)
        if grad:
            session.keep_grads(model.module)
        if plan.uses_attention_sites():
            attention.use_sites(session, model.module)
        if plan.uses_moe_sites():
            moe.use_sites(session, model.module)
        run = TraceRun(model, cell, graph, ns, generate, session, ignore_eos, options)
        run.sched.copied |= {id(m) for m in changed_in_place(model.module)}
        try:
            with active.tracing(run):
                output, batch = _interleave(run, cell, ns, line_input, plan, fake)
        finally:
            run.sched.kill()
    sched = run.sched
    return Outcome(graph, sched.final_output, batch, sched.step + 1,
                   time.perf_counter() - start, sched.stop_line, sched.loss)


def _interleave(run: TraceRun, cell: CompiledCell, ns: dict, line_input: Any, plan: HookPlan,
                fake: bool) -> tuple[Any, Batch]:
    """The set-up (which registers the invokes), the invokes interleaved with the forward,
    then the code after it."""
    __tracebackhide__ = True
    after_setup: dict[str, Any] = {}
    if line_input is not NO_INPUT:
        run.planned = [(0, line_input, {})]
    else:
        exec(cell.before, ns)  # the statements up to the last invoke; registers each invoke
        run.check_taken()
        after_setup = {n: ns[n] for n in cell.varying if n in ns}
        if not run.planned:
            raise InterventionError("the cell registered no invoke: the loops around its "
                                    "`with tracer.invoke(...)` blocks ran no iteration",
                                    line=cell.invokes[0].line)
    line = cell.invokes[0].line if line_input is NO_INPUT else None
    with _real_tensors() if fake else nullcontext():  # inputs are real even in a dry run
        batch = run.model.prepare([x for _, x, _ in run.planned], line=line,
                                  new_tokens=run.generate or 0)
    if run.generate is not None and "labels" in batch.kwargs:
        raise InterventionError("labels= gives the loss of one forward; it does not go with "
                                "--generate (generate takes no labels)", line=line)
    own: list[dict[str, Any]] = [{} for _ in run.planned]
    bodies = [(code, _body(cell, cell.invokes[code], ns, names, own[i]))
              for i, (code, _, names) in enumerate(run.planned)]
    run.sched.enter = run.enter if cell.varying else None
    try:
        run.sched.start(bodies, batch)
        run.hooks.install(plan)
        output = run.forward(batch)
        run.sched.finish(output)
    finally:
        ns.update(after_setup)  # the set-up's last values, as the cell leaves them
    run.order_appends()
    for names in own:  # each invoke's own names, in invoke order: the last one's stay
        ns.update(names)
    run.sched.check_changed()
    if cell.after is not None:
        exec(cell.after, ns)
    return run.sched.final_output, batch


def _check_lengths(lengths: list, items: list, base: int, added: list) -> None:
    for index, seen, n, own, line in lengths:
        right = base + sum(j < index for j, _, _ in added) + own
        if seen is items and n != right:
            raise InterventionError(
                f"`len(...)` of a list several invokes append to was {n} when this line ran, "
                f"but the list ends in invoke order, where it is {right} at that point of this "
                "invoke: an index taken from it during the forward would point at another "
                "invoke's item. Key the results by the loop variable (`res[layer] = ...`), or "
                "read `xs[-1]` right after the append", line=line)


def _real_tensors() -> Any:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def _body(cell: CompiledCell, invoke: InvokeCode, ns: dict, names: dict[str, Any],
          own: dict[str, Any]) -> Callable[[], None]:
    """What an invoke's greenlet runs: the cell's code (INPUT on the magic line), or the
    invoke block's function called with the names it captured; its own names land in ``own``."""
    if invoke.body.co_flags & 0x02 == 0:  # module code, not a function's (CO_NEWLOCALS)
        return lambda: exec(invoke.body, ns)
    function = FunctionType(invoke.body, ns)
    args = {p: names.get(p, facade.UNSET) for p in invoke.params}

    def run() -> None:
        __tracebackhide__ = True
        try:
            bound = function(**args)
        except UnboundLocalError as exc:
            raise unbound_own_name(exc, cell, invoke) from exc
        except (IndexError, KeyError) as exc:
            _note_filled_later(exc, cell, invoke)
            raise
        own.update((k, v) for k, v in bound.items() if k in invoke.own)

    return run


def _note_filled_later(exc: Exception, cell: CompiledCell, invoke: InvokeCode) -> None:
    """An item of a list another invoke fills was asked for before the forward got there."""
    line = cell_line(exc, cell.filename)
    names = sorted({n for st in cell.graph.statements if st.line == line for n in st.uses}
                   & invoke.shared)
    if names:
        exc.add_note(f"ipy_intervene: line {line} reads {', '.join(f'`{n}`' for n in names)}, "
                     "which another invoke fills as the forward runs; at this moment it does "
                     "not hold that item yet. Read it in the line that changes the site of the "
                     "same layer (that value is computed when the forward reaches the site)")


def unbound_own_name(exc: UnboundLocalError, cell: CompiledCell,
                     invoke: InvokeCode) -> Exception:
    """An invoke read one of its own names before binding it: say whose names are whose."""
    found = re.search(r"'(\w+)'", str(exc))
    name = getattr(exc, "name", None) or (found.group(1) if found else None)
    binders = [i.line for i in cell.invokes if i is not invoke and name in i.own]
    if name is None or not (binders or name in invoke.own):
        return exc
    also = (f"; the invoke block at line {', '.join(map(str, binders))} binds a `{name}` of its "
            "own" if binders else "")
    return InterventionError(
        f"`{name}` is read before this invoke has bound it: every name an invoke binds is "
        f"that invoke's own (each item of a loop of invokes is an invoke){also}. To use a "
        f"value another invoke collects, bind it in one invoke block of its own (not in a "
        f"loop of invokes), and read it here", line=cell_line(exc, cell.filename))
