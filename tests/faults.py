"""Real Ctrl-Cs for the interrupt tests (tests/test_interrupts.py), and a check that a model
is exactly as it was.

A Ctrl-C here is ``os.kill(os.getpid(), signal.SIGINT)``: whatever SIGINT handler is
installed at that instant (Python's, or one ipy_intervene installs) decides what happens,
as in a notebook. Never a ``raise KeyboardInterrupt``.

- :func:`sigint_at_call` wraps a callable attribute (``RemovableHandle.remove``, a
  property's setter, a class) so that its k-th call sends SIGINT first, then does its work.
- :func:`run_trial` and :func:`run_with_timer` run one attempt and report how it ended,
  catching the KeyboardInterrupt wherever it lands (a signal still pending at the end of
  the run is let in inside the ``try``).
- :class:`Pristine` snapshots a model (and the process-wide state a run may touch) and lists
  every way it differs afterwards; :meth:`Pristine.repair` puts it back so the next trial
  starts clean even after a failure.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.nn.modules import module as torch_module
from torch.utils.hooks import RemovableHandle

from conftest import checksum, hook_count

PID = os.getpid()


def sigint() -> None:
    """A real Ctrl-C, delivered to this process (the main thread handles it)."""
    os.kill(PID, signal.SIGINT)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a block (the previous count after it). On the demo model one
    thread is as fast as two, and it does not slow down tenfold when another process shares
    the cores (idle OpenMP workers spin), which keeps these files' run time steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- where to inject -----------------------------------------------------------------------

class Counter:
    """How many times a wrapped callable ran, and whether the SIGINT was sent."""

    def __init__(self, at: int | None) -> None:
        self.at, self.calls, self.sent = at, 0, False

    def tick(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.sent = True
            sigint()


@contextlib.contextmanager
def sigint_at_removal(at: int | None) -> Iterator[Counter]:
    """``RemovableHandle.remove``'s ``at``-th call sends SIGINT, then removes the hook
    (if the SIGINT handler lets it go on). ``at=None``: count only."""
    counter, original = Counter(at), RemovableHandle.remove

    def remove(self: RemovableHandle) -> None:
        counter.tick()
        original(self)

    RemovableHandle.remove = remove
    try:
        yield counter
    finally:
        RemovableHandle.remove = original


@contextlib.contextmanager
def sigint_at_grad_mode(at: int | None) -> Iterator[Counter]:
    """The ``at``-th ``torch.set_grad_enabled(mode)`` (called as a function, as a context
    manager, or by ``torch.no_grad()``) sends SIGINT before it changes the mode."""
    counter, original = Counter(at), torch.set_grad_enabled

    class set_grad_enabled(original):  # type: ignore[misc, valid-type]
        def __init__(self, mode: bool) -> None:
            counter.tick()
            super().__init__(mode)

    torch.set_grad_enabled = set_grad_enabled
    try:
        yield counter
    finally:
        torch.set_grad_enabled = original


@contextlib.contextmanager
def sigint_at_grad_assignment(at: int | None) -> Iterator[Counter]:
    """The ``at``-th assignment ``tensor.grad = ...`` (a parameter's ``.grad`` being put
    back, say) sends SIGINT before it happens. Reads of ``.grad`` are unchanged."""
    counter, base = Counter(at), torch._C.TensorBase.grad
    had = "grad" in torch.Tensor.__dict__
    previous = torch.Tensor.__dict__.get("grad")

    def get(self: torch.Tensor) -> Any:
        return base.__get__(self, type(self))

    def set_(self: torch.Tensor, value: Any) -> None:
        counter.tick()
        base.__set__(self, value)

    def delete(self: torch.Tensor) -> None:
        counter.tick()
        base.__delete__(self)

    torch.Tensor.grad = property(get, set_, delete)
    try:
        yield counter
    finally:
        if had:
            torch.Tensor.grad = previous
        else:
            del torch.Tensor.grad


INJECTION_POINTS: dict[str, Callable[[int | None], contextlib.AbstractContextManager]] = {
    "hook removal": sigint_at_removal,
    "grad mode change": sigint_at_grad_mode,
    ".grad assignment": sigint_at_grad_assignment,
}


# -- one attempt ---------------------------------------------------------------------------

@dataclass
class Trial:
    """How one attempt ended."""

    sent: bool = False          # a SIGINT was sent during it
    interrupted: bool = False   # a KeyboardInterrupt came out (caught here)
    returned: bool = False      # the run itself returned
    value: Any = None           # what it returned
    error: BaseException | None = None  # any other exception

    def problems(self) -> list[str]:
        out = []
        if self.error is not None:
            out.append(f"raised {type(self.error).__name__} instead of KeyboardInterrupt: "
                       f"{_one_line(self.error)}")
        if self.sent and not self.interrupted:
            out.append("the Ctrl-C was lost: no KeyboardInterrupt came out")
        if self.interrupted and not self.sent:
            out.append("a KeyboardInterrupt came out with no Ctrl-C sent in this trial "
                       "(one held from an earlier trial, delivered late?)")
        return out


def _one_line(exc: BaseException, limit: int = 100) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run_trial(fn: Callable[[], Any], injection: contextlib.AbstractContextManager) -> Trial:
    """``fn()`` with ``injection`` in force (it may send a SIGINT from inside the run)."""
    trial = Trial()
    with injection as counter:
        try:
            try:
                trial.value = fn()
                trial.returned = True
            except Exception as exc:  # noqa: BLE001 - reported as a problem
                trial.error = exc
            time.sleep(0.001)  # a SIGINT still held when the run ended is handled here
        except KeyboardInterrupt:
            trial.interrupted = True
    trial.sent = counter.sent
    return trial


def run_with_timer(fn: Callable[[], Any], delay: float) -> Trial:
    """``fn()`` with a SIGINT sent from another thread ``delay`` seconds after it starts
    (or after it ended, in which case the KeyboardInterrupt lands after it)."""
    trial, fired = Trial(), threading.Event()

    def fire() -> None:
        fired.set()
        sigint()

    timer = threading.Timer(delay, fire)
    try:
        try:
            timer.start()
            try:
                trial.value = fn()
                trial.returned = True
            except Exception as exc:  # noqa: BLE001 - reported as a problem
                trial.error = exc
            finally:
                timer.join()
            time.sleep(0.001)  # the signal, if not handled yet, is handled here
        except KeyboardInterrupt:
            trial.interrupted = True
    finally:
        timer.join()
    trial.sent = fired.is_set()
    return trial


# -- the model is as it was ------------------------------------------------------------------

_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks",
                 "_global_module_registration_hooks", "_global_parameter_registration_hooks",
                 "_global_buffer_registration_hooks")


def _global_hooks() -> dict[str, int]:
    return {name: len(getattr(torch_module, name)) for name in _GLOBAL_HOOKS
            if hasattr(torch_module, name)}


@dataclass
class Pristine:
    """A model's state before the trials, and the process-wide state a run touches."""

    module: torch.nn.Module
    input_ids: torch.Tensor
    fresh: torch.nn.Module | None = None  # a copy taken at the start (made here if None)
    weights: float = field(init=False)
    reference: torch.Tensor = field(init=False)
    grad_mode: bool = field(init=False)
    handler: Any = field(init=False)
    global_hooks: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        assert hook_count(self.module) == 0
        assert all(p.grad is None for p in self.module.parameters())
        if self.fresh is None:
            self.fresh = copy.deepcopy(self.module)
        self.weights = checksum(self.fresh)
        assert checksum(self.module) == self.weights
        self.grad_mode = torch.is_grad_enabled()
        self.handler = signal.getsignal(signal.SIGINT)
        self.global_hooks = _global_hooks()
        with torch.no_grad():
            self.reference = self.fresh(self.input_ids).logits
            assert torch.equal(self.module(self.input_ids).logits, self.reference)

    def problems(self) -> list[str]:
        """Every way the model (or the process) differs from the snapshot."""
        out = []
        if torch.is_grad_enabled() != self.grad_mode:
            out.append(f"grad mode is {torch.is_grad_enabled()}, was {self.grad_mode}")
        if signal.getsignal(signal.SIGINT) is not self.handler:
            out.append(f"the SIGINT handler is {signal.getsignal(signal.SIGINT)!r}, was "
                       f"{self.handler!r}")
        hooks = hook_count(self.module)
        if hooks:
            out.append(f"{hooks} hook(s) / replaced forward(s) left on the model")
        forwards = [name or "<root>" for name, m in self.module.named_modules()
                    if "forward" in m.__dict__]
        if forwards:
            out.append(f"'forward' in __dict__ of: {', '.join(forwards)}")
        if _global_hooks() != self.global_hooks:
            out.append(f"global module hooks changed: {_global_hooks()} (were "
                       f"{self.global_hooks})")
        grads = [name for name, p in self.module.named_parameters() if p.grad is not None]
        if grads:
            out.append(f"{len(grads)} parameter(s) have a .grad (none had), e.g. {grads[0]}")
        if checksum(self.module) != self.weights:
            out.append("the weights changed")
        try:
            with torch.no_grad():
                logits = self.module(self.input_ids).logits
        except Exception as exc:  # noqa: BLE001 - e.g. a hook left behind that fails
            out.append(f"the next plain forward of the raw module raised "
                       f"{type(exc).__name__}: {_one_line(exc)}")
            return out
        if not torch.equal(logits, self.reference):
            out.append("the next plain forward of the raw module differs from a fresh copy's "
                       f"(max abs diff {float((logits - self.reference).abs().max()):.3g})")
        return out

    def repair(self) -> None:
        """Put everything back as in the snapshot (after a failed trial)."""
        for m in self.module.modules():
            for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                         "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                         "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
                getattr(m, name, {}).clear()
            m.__dict__.pop("forward", None)
        with torch.no_grad():
            self.module.load_state_dict(self.fresh.state_dict())
        for p in self.module.parameters():
            p.grad = None
        torch.set_grad_enabled(self.grad_mode)
        signal.signal(signal.SIGINT, self.handler)


def report(failures: list[str], trials: int, what: str) -> str:
    """The assertion message: how many of ``trials`` failed and the first few, in order."""
    shown = "\n".join(f"  - {line}" for line in failures[:8])
    more = f"\n  ... and {len(failures) - 8} more" if len(failures) > 8 else ""
    return f"{len(failures)} of {trials} {what} left something changed:\n{shown}{more}"
