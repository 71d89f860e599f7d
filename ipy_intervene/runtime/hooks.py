"""The trace's hooks: a pre-hook and a forward hook on each module the cell uses (and on
the root, which counts generation steps), and a replaced ``forward`` on modules the cell
may skip. All live in one :class:`~ipy_intervene.infra.hooks.HookSession`, so they are removed
together, act only in the trace's scope and disarm themselves once it has ended.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ipy_intervene.compiler.validate import HookPlan
from ipy_intervene.infra.hooks import HookSession
from ipy_intervene.runtime.access import Inputs, Output, apply_skips, skipped_output
from ipy_intervene.runtime.scheduler import OUT, PRE, Scheduler


class StopForward(BaseException):
    """Raised from a hook after ``tracer.stop()``; ends the forward early."""


class TraceHooks:
    """Installs the trace's hooks on demand; each fired hook serves the scheduler."""

    def __init__(self, session: HookSession, sched: Scheduler, root: nn.Module) -> None:
        self.session, self.sched, self.root = session, sched, root
        self.hooked: set[tuple[str, int]] = set()
        self.skippable: set[int] = set()

    def install(self, plan: HookPlan) -> None:
        """The hooks validation found the cell needs (more are added when a site asks)."""
        self.ensure(self.root, PRE)
        self.ensure(self.root, OUT)
        for module in plan.pre.values():
            self.ensure(module, PRE)
        for module in plan.out.values():
            self.ensure(module, OUT)
        for module in plan.skip.values():
            self.ensure_skippable(module)

    def ensure(self, module: nn.Module, phase: str) -> None:
        key = (phase, id(module))
        if key in self.hooked:
            return
        self.hooked.add(key)
        if phase == PRE:
            self.session.pre(module, self._pre_hook(module))
        else:
            self.session.post(module, self._out_hook(module))

    def _pre_hook(self, module: nn.Module):
        sched, key, is_root = self.sched, id(module), module is self.root

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            __tracebackhide__ = True
            sched.check_served()
            if is_root:
                sched.new_step()
            sched.fired[(PRE, key)] = sched.step
            holder = Inputs(args, kwargs)
            sched.retained[(PRE, key)] = holder
            holder.link(sched, mod)
            if sched.wanted(PRE, key):
                sched.serve(holder, PRE, key)
            holder.settle()
            sched.settled()
            self._stop_if_asked()
            return (holder.args, holder.kwargs) if holder.changed else None

        return pre_hook

    def _out_hook(self, module: nn.Module):
        sched, key, is_root = self.sched, id(module), module is self.root

        def out_hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            __tracebackhide__ = True
            sched.check_served()
            sched.fired[(OUT, key)] = sched.step
            holder = Output(output, is_root)
            if key in sched.skips:  # skipped through an alias: the module ran, its output goes
                holder.set(apply_skips(sched.skips.pop(key), output, sched.batch.size))
            sched.retained[(OUT, key)] = holder
            holder.link(sched, mod)
            if sched.wanted(OUT, key) or (is_root and sched.wants_logits()):
                sched.serve(holder, OUT, key)
            holder.settle()
            sched.settled()
            self._stop_if_asked()
            return holder.value if holder.changed else None

        return out_hook

    def _stop_if_asked(self) -> None:
        if self.sched.stop_line is not None:
            raise StopForward()

    def ensure_skippable(self, module: nn.Module) -> None:
        """Let ``module.skip(value)`` replace the module's work for some rows."""
        if id(module) in self.skippable:
            return
        self.skippable.add(id(module))
        sched, key = self.sched, id(module)

        def make(original):
            def forward(*args: Any, **kwargs: Any) -> Any:
                skips = sched.skips.pop(key, None)
                if not skips:
                    return original(*args, **kwargs)
                return skipped_output(skips, sched.batch.size, lambda: original(*args, **kwargs))
            return forward

        self.session.replace_forward(module, make)
