"""An edit's lasting hooks: plain PyTorch hooks on the edited model's modules (no hook
session: they act in every context, until :meth:`EditHooks.remove`), each serving the edit's
current run as a trace's hooks serve its run (``runtime/hooks.py``).

The root's pre-hook starts a run at each forward that begins a text (no key/value cache yet)
and goes on with it at each later generation step; its forward hook (always called) checks
that every site the edit's code asked for was reached, and ends a run whose code has
finished. A hook of the edit that fires outside such a forward (a module called on its own,
ad hoc from a cell; every sweep of an edited model runs whole forwards) runs the edit on
that call.
Under autograd the edit is served copies of the values it reads or changes (see :func:`_own`).
"""

from __future__ import annotations

import sys
from typing import Any

import greenlet
import torch
from torch import nn

from ipy_intervene.edits.run import EditRun, batch_of, cache_length, call_batch, tokens_of
from ipy_intervene.errors import InterventionError, cell_line
from ipy_intervene.infra.interrupts import uninterruptible
from ipy_intervene.runtime.access import Inputs, Output
from ipy_intervene.runtime.scheduler import OUT, PRE


class EditHooks:
    """The hooks of one edit on one model, and the run they serve."""

    def __init__(self, edit: Any, root: nn.Module) -> None:
        self.edit, self.root = edit, root
        self.handles: list[Any] = []
        self.hooked: set[tuple[str, int]] = set()
        self.run: EditRun | None = None        # the forward's run (and its generation's)
        self.call: tuple[int, EditRun] | None = None   # (module id, run) of a call alone
        self.forwarding = False                # a forward of the whole model is running
        self.serving = False                   # the edit's own code is running
        self.text: tuple[int, int] | None = None   # (rows, positions) of the last text

    # -- installing ----------------------------------------------------------------------

    def install(self, plan: Any) -> None:
        self._root_hooks()
        for module in plan.pre.values():
            self.add(module, PRE)
        for module in plan.out.values():
            self.add(module, OUT)

    @uninterruptible
    def add(self, module: nn.Module, phase: str) -> None:
        key = (phase, id(module))
        if key in self.hooked:
            return
        self.hooked.add(key)
        fn = self._pre(module) if phase == PRE else self._out(module)
        fn._ii_edit = self.edit   # the sweep memo tells an edit's hooks from others
        if phase == PRE:
            self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            self.handles.append(module.register_forward_hook(fn))

    @uninterruptible
    def remove(self) -> None:
        """No hook of this edit is left; its runs end."""
        while self.handles:
            self.handles.pop().remove()
        self.hooked.clear()
        self._drop()
        self._drop_call()

    def _root_hooks(self) -> None:
        begin, end = self._begin, self._end

        def begin_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            begin(args, kwargs)

        def end_hook(mod: nn.Module, args: tuple, output: Any) -> None:
            end(output)

        begin_hook._ii_edit = end_hook._ii_edit = self.edit
        self.handles.append(self.root.register_forward_pre_hook(begin_hook, with_kwargs=True))
        self.handles.append(self.root.register_forward_hook(end_hook, always_call=True))

    # -- a forward of the whole model ------------------------------------------------------

    def _begin(self, args: tuple, kwargs: dict) -> None:
        """A forward of the whole model: a new text (a new run), or the next step of the
        text being generated (its run goes on)."""
        if self.serving or self.forwarding and _calls_of(self.root) > 1:
            return   # the model called from the edit's own code, or from inside a forward
        if self.forwarding:   # the last forward ended without its end hook (a KeyboardInterrupt)
            self.forwarding = False
            self._drop()
            self.text = None
        seen = cache_length(kwargs)
        tokens = tokens_of(args, kwargs)
        rows = int(tokens.shape[0]) if tokens is not None else None
        if seen and self.text is not None and self.text == (rows, seen):
            if self.run is not None:
                self.run.sched.new_step()
        elif seen:
            raise InterventionError(
                f"the edit `{self.edit.name}` ({self.edit.where}): this forward continues a "
                f"key/value cache of {seen} positions that this edited model did not compute "
                "as one text (the edit would not know each prompt's positions). Start the "
                "text on this model (generate does), without past_key_values")
        else:
            self._drop()
            self.run = EditRun(self.edit, batch_of(args, kwargs, self.edit.name))
            self._guard(self.run, self.run.start)
        self.forwarding = True
        if tokens is not None:
            self.text = (rows, seen + int(tokens.shape[1]))

    def _end(self, output: Any) -> None:
        if not self.forwarding:
            return
        self.forwarding = False
        run = self.run
        if run is None:
            return
        if output is None:   # the forward failed
            self._drop()
            return
        missed = run.pending_sites()
        if missed:
            error = run.sched.unreached(missed[0])
            self._drop()
            raise self._noted(error, error.line)
        if not run.busy():
            self._drop()

    def _drop(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.end()

    def _drop_call(self) -> None:
        call, self.call = self.call, None
        if call is not None:
            call[1].end()

    # -- each hooked module ----------------------------------------------------------------

    def _run_for(self, module: nn.Module, value: Any, phase: str) -> EditRun | None:
        """The run this firing serves: the forward's, else a run of this call alone."""
        if self.serving:
            return None
        run = self.run
        if self.forwarding and run is not None and greenlet.getcurrent() is run.sched.main:
            return run
        if self.forwarding and run is None:
            return None    # the edit's code has finished for this text
        call = self.call
        if call is not None and call[0] == id(module) and phase == OUT:
            return call[1]
        self._drop_call()
        self.edit.check_alone(module)
        run = EditRun(self.edit, call_batch(value), call=True)
        self.call = (id(module), run)
        self._guard(run, run.start)
        return run

    def _last(self, module: nn.Module, phase: str, run: EditRun) -> None:
        """After the last hook of a call alone: every site asked for must have been reached."""
        if not run.call or (phase == PRE and (OUT, id(module)) in self.hooked):
            return
        missed = run.pending_sites()
        self._drop_call()
        if missed:
            error = run.sched.unreached(missed[0])
            raise self._noted(error, error.line)

    def _pre(self, module: nn.Module):
        key = id(module)

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            __tracebackhide__ = True
            run = self._run_for(mod, args[0] if args else kwargs, PRE)
            if run is None:
                return None
            sched = run.sched
            sched.fired[(PRE, key)] = sched.step
            holder = Inputs(args, kwargs)
            if sched.wanted(PRE, key) and torch.is_grad_enabled() and (args or kwargs):
                holder.set_first(*_owned(holder.first()))
            sched.retained[(PRE, key)] = holder
            holder.link(sched, mod)
            if sched.wanted(PRE, key):
                self._guard(run, lambda: sched.serve(holder, PRE, key))
            holder.settle()
            self._last(mod, PRE, run)
            return (holder.args, holder.kwargs) if holder.changed else None

        return pre_hook

    def _out(self, module: nn.Module):
        key = id(module)

        def out_hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            __tracebackhide__ = True
            run = self._run_for(mod, output, OUT)
            if run is None:
                return None
            sched = run.sched
            sched.fired[(OUT, key)] = sched.step
            holder = Output(output, mod is self.root)
            if sched.wanted(OUT, key) and torch.is_grad_enabled() and mod is not self.root:
                holder.set(_own(output))
            sched.retained[(OUT, key)] = holder
            holder.link(sched, mod)
            if sched.wanted(OUT, key):
                self._guard(run, lambda: sched.serve(holder, OUT, key))
            holder.settle()
            self._last(mod, OUT, run)
            return holder.value if holder.changed else None

        return out_hook

    def _guard(self, run: EditRun, serve: Any) -> None:
        """Run the edit's code; an error it raises ends the run and names the edit's line."""
        __tracebackhide__ = True
        self.serving = True
        try:
            serve()
        except BaseException as exc:
            if run is self.run:
                self._drop()
            elif self.call is not None and run is self.call[1]:
                self._drop_call()
            else:
                run.end()
            if isinstance(exc, Exception):
                self._noted(exc, None)
            raise
        finally:
            self.serving = False

    def _noted(self, exc: Exception, line: int | None) -> Exception:
        """``exc`` with the edit's line attached and a note naming the edit."""
        line = line if line is not None else cell_line(exc, self.edit.filename)
        if isinstance(exc, InterventionError):
            exc.at_line(line)
            line = exc.line
        if not getattr(exc, "_ii_edit_noted", False):
            at = f", line {line}" if line is not None else ""
            exc.add_note(f"ipy_intervene: raised by the edit `{self.edit.name}` "
                         f"({self.edit.where}{at}), which runs at every forward of the edited "
                         "model; ii.edits(model) lists its edits, ii.clear_edits(model) "
                         "removes them")
            try:
                exc._ii_edit_noted = True
            except AttributeError:
                pass
        return exc


def _owned(item: tuple[Any, Any]) -> tuple[Any, Any]:
    return item[0], _own(item[1])


def _own(value: Any) -> Any:
    """``value`` with its tensors that autograd tracks copied: under autograd, the edit
    changes a copy (the module's own output may be saved for the backward, which an
    in-place change would break, as for attention's output)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.requires_grad else value
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        return type(value)(_own(v) for v in value)
    return value


def _calls_of(root: nn.Module) -> int:
    """How many calls of ``root`` are running on this thread's stack (its ``_call_impl``
    frames): 1 in a forward's own hooks, more when a forward calls the model again."""
    count, frame = 0, sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_call_impl" and frame.f_locals.get("self") is root:
            count += 1
        frame = frame.f_back
    return count
