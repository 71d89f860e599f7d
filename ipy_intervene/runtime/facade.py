"""``__ii__``: what the rewritten cell calls, and ``tracer``.

The facade holds no state: each call finds the trace running in this context
(:func:`ipy_intervene.infra.active.current_trace`) and hands it the request. So a function a cell
defines keeps working after the cell: outside a trace its control flow runs as plain Python
(``__ii__.branch``/``loop`` only count when a trace runs) and its sites say that no forward is
running. It lives in ``builtins`` (as IPython's ``get_ipython`` does), never in the notebook.

>>> FACADE.index[:, -1]
(slice(None, None, None), -1)
"""

from __future__ import annotations

import builtins
import sys
from typing import Any, Iterable, Iterator

from ipy_intervene.errors import InterventionError
from ipy_intervene.habits.explain import check_row0
from ipy_intervene.infra import active

NAME = "__ii__"


class _Unset:
    """An invoke's captured name that was not bound when the invoke was registered."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET = _Unset()


class _IndexMaker:
    """Turns subscript syntax into the index value it denotes."""

    def __getitem__(self, key: Any) -> Any:
        return key


def _own(run: Any, frame_depth: int = 2) -> bool:
    """True when the calling cell code is the running trace's cell (not a function that an
    earlier cell defined), so its site and region ids index this run's graph."""
    return sys._getframe(frame_depth).f_code.co_filename == run.filename


class Facade:
    """``__ii__.read(envoy, "output", site_id)`` and friends."""

    index = _IndexMaker()  # ``__ii__.index[:, -1]`` -> ``(slice(None), -1)``
    UNSET = UNSET

    def read(self, envoy: Any, attr: str, sid: int | None) -> Any:
        __tracebackhide__ = True
        run = active.require_trace(f".{attr}")
        return run.ask(envoy, attr, "read", sid if _own(run) else None, None)

    def row0(self, value: Any, envoy: Any) -> Any:
        """``envoy.output[0]``, unless that is a layer's batch row 0 by habit."""
        __tracebackhide__ = True
        module = getattr(envoy, "module", envoy)
        check_row0(value, module, f"model.{getattr(envoy, 'path', '')}.output")
        return value[0]

    def arrive(self, envoy: Any, attr: str, sid: int | None) -> None:
        """Wait until the forward reaches the site this line is about to change."""
        __tracebackhide__ = True
        run = active.require_trace(f".{attr}")
        run.ask(envoy, attr, "arrive", sid if _own(run) else None, None)

    def write(self, envoy: Any, attr: str, value: Any, sid: int | None) -> None:
        __tracebackhide__ = True
        run = active.require_trace(f".{attr}")
        run.ask(envoy, attr, "write", sid if _own(run) else None, value)

    def setitem(self, envoy: Any, attr: str, index: Any, value: Any, sid: int | None) -> None:
        __tracebackhide__ = True
        run = active.require_trace(f".{attr}")
        run.ask(envoy, attr, "edit", sid if _own(run) else None, (index, value))

    def augment(self, envoy: Any, attr: str, op: str, value: Any, sid: int | None) -> None:
        __tracebackhide__ = True
        run = active.require_trace(f".{attr}")
        run.ask(envoy, attr, "augment", sid if _own(run) else None, (op, value))

    def skip(self, envoy: Any, value: Any, sid: int | None) -> None:
        __tracebackhide__ = True
        run = active.require_trace(".skip()")
        run.ask(envoy, "skip", "skip", sid if _own(run) else None, value)

    def call(self, target: Any, sid: int | None, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        run = active.current_trace()
        if run is None:
            return target(*args, **kwargs)
        return run.call(target, sid if _own(run) else None, args, kwargs)

    def model_output(self, sid: int | None) -> Any:
        __tracebackhide__ = True
        run = active.require_trace("tracer.output")
        return run.model_output(sid if _own(run) else None)

    def add_invoke(self, code: int, input_: Any) -> None:
        """An invoke of block ``code`` joins the batch with ``input_``; it keeps the values
        its names have now in the cell's namespace (loop variables, lists made before it)."""
        __tracebackhide__ = True
        names = sys._getframe(1).f_globals
        active.require_trace("tracer.invoke").add_invoke(code, input_, names)

    def append(self, items: Any, how: str, value: Any) -> None:
        """``items.append(value)`` (or ``extend``) from an invoke: in a trace, noted so the
        list ends in invoke order."""
        run = active.current_trace()
        if run is None or not _own(run) or type(items) is not list:
            getattr(items, how)(value)
        else:
            run.append_in_order(items, how, value)

    def stop(self, line: int) -> None:
        """``tracer.stop()`` at cell line ``line``."""
        active.require_trace("tracer.stop()").stop(line)

    def length(self, fn: Any, items: Any, line: int) -> Any:
        """``len(items)`` from an invoke (``fn``: what ``len`` is there): in a trace, noted so
        that a length taken before the list is put in invoke order is checked."""
        run = active.current_trace()
        if fn is not len or run is None or not _own(run) or type(items) is not list:
            return fn(items)
        return run.length_in_order(items, line)

    def fill(self, items: list, values: Iterable[Any]) -> None:
        """``name = [... for ...]`` that other invokes read: ``items`` grows as the forward
        reaches each value, so they can use it layer by layer."""
        for value in values:
            items.append(value)

    def wait_for(self, names: tuple[str, ...], line: int) -> None:
        __tracebackhide__ = True
        run = active.current_trace()
        if run is not None and _own(run):
            run.wait_for(names, line)

    def bound(self, names: tuple[str, ...]) -> None:
        run = active.current_trace()
        if run is not None and _own(run):
            run.bound(names)

    def branch(self, region: int, test: Any) -> Any:
        run = active.current_trace()
        if run is not None and _own(run):
            run.count_branch(region, bool(test))
        return test

    def loop(self, region: int, iterable: Iterable[Any]) -> Iterator[Any]:
        run = active.current_trace()
        if run is None or not _own(run):
            yield from iterable
            return
        for item in iterable:
            run.count_iteration(region)
            yield item

    @property
    def tracer(self) -> "TracerFacade":
        return TRACER


class TracerFacade:
    """``tracer`` inside a cell: ``invoke``, ``steps``, ``stop`` and ``output``."""

    def invoke(self, x: Any):  # pragma: no cover - the compiler turns invoke blocks into code
        raise InterventionError("`tracer.invoke` must be a `with` block at the top level of "
                                "the cell (or the only statement of a top-level `for` loop)")

    def steps(self, n: int | None = None) -> Iterator[int]:
        """Iterate generation steps; sites in the loop body refer to that step.

        >>> for step in tracer.steps():                       # doctest: +SKIP
        ...     logits = model.lm_head.output
        """
        return active.require_trace("tracer.steps()").steps(n)

    def stop(self) -> None:
        """End the forward after the current module; sites after it are not reached."""
        active.require_trace("tracer.stop()").stop(None)

    @property
    def output(self) -> Any:
        """Logits for a trace, token ids for a generation."""
        return active.require_trace("tracer.output").model_output(None)

    def __repr__(self) -> str:
        run = active.current_trace()
        return "<tracer: no trace running>" if run is None else \
            f"<tracer: {len(run.sched.invokes)} invoke(s)>"


FACADE = Facade()
TRACER = TracerFacade()


def install() -> None:
    """Make ``__ii__`` resolvable from any namespace (it is looked up in ``builtins``)."""
    if getattr(builtins, NAME, None) is not FACADE:
        setattr(builtins, NAME, FACADE)
