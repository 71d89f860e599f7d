"""The one hook layer: every forward hook, replaced forward and grad change ipy_intervene
makes goes through a :class:`HookSession`, used by traces, sweeps, the block capture and the
lens.

Three promises:

- **Removed together.** Leaving the ``with`` block removes every hook, restores every
  replaced ``forward``, every parameter's ``.grad`` and the grad mode, and that cleanup runs
  to its end even if Ctrl-C lands in the middle of it (:mod:`ipy_intervene.infra.interrupts`).
- **Self-disarming.** A hook whose session has ended passes values through untouched and
  removes itself, so even a hook that survived somehow cannot change a forward.
- **Scoped.** A hook acts only while its session is in the hook scope of the running context
  (:mod:`ipy_intervene.infra.active`). A session opened inside another joins its scope (the
  attribution sweep's gradient root stays on while it records), except inside an
  ``exclusive`` one: a trace's. So a sweep inside a ``%%trace`` cell, or a module called ad
  hoc, does not trigger the trace's hooks.

One rule for a module's input tensor, shared by ``m.input`` and the sweep sites:
:func:`input_key`.

>>> with HookSession() as hooks:                             # doctest: +SKIP
...     hooks.post(block, lambda module, args, output: seen.append(output))
...     model(**inputs)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, TypeVar

import torch
from torch import nn

from ipy_intervene.infra import active
from ipy_intervene.infra.interrupts import entering, holding, uninterruptible

F = TypeVar("F", bound=Callable[..., Any])
PreFn = Callable[[nn.Module, tuple, dict], "tuple[tuple, dict] | None"]
PostFn = Callable[[nn.Module, tuple, Any], Any]


def input_key(args: tuple, kwargs: dict) -> int | str | None:
    """Where a module call's input tensor is: ``0`` (first positional argument), else the
    ``hidden_states`` keyword, else the first keyword; None for a call without arguments."""
    if args:
        return 0
    if "hidden_states" in kwargs:
        return "hidden_states"
    return next(iter(kwargs), None)


def replace_input(args: tuple, kwargs: dict, key: int | str, value: Any) -> tuple[tuple, dict]:
    """(args, kwargs) with the input at ``key`` (from :func:`input_key`) replaced."""
    if key == 0:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, key: value}


def edit_names(root: nn.Module) -> list[str]:
    """The names of the lasting edits (``ii.edit``) on the model ``root``, read off the
    root hooks each edit marks (``_ii_edit``), in the order they apply."""
    return [f._ii_edit.name for f in root._forward_pre_hooks.values()
            if hasattr(getattr(f, "_ii_edit", None), "name")]


def undoer(obj: Any, name: str) -> Callable[[], None]:
    """What puts ``obj.name`` back as it is now, once it has been set: the value set back,
    or, for an attribute ``obj`` has from its class only (a method), the instance attribute
    deleted so that nothing is left on ``obj``.

    >>> class C:
    ...     def f(self): return 1
    >>> c = C(); undo = undoer(c, "f"); c.f = lambda: 2; undo(); "f" in vars(c)
    False
    """
    own = getattr(obj, "__dict__", {})
    if (name in own or hasattr(getattr(type(obj), name, None), "__set__")
            or any(name in own.get(t, ()) for t in ("_modules", "_parameters", "_buffers"))):
        previous = getattr(obj, name)
        return lambda: setattr(obj, name, previous)
    return lambda: delattr(obj, name)


class HookSession:
    """Hooks that live for one ``with`` block and act only in its scope."""

    def __init__(self, *, exclusive: bool = False) -> None:
        self.exclusive = exclusive
        self.live = False
        self._handles: list[Any] = []
        self._forwards: list[tuple[nn.Module, bool, Any, Any]] = []
        self._grads: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._grad_mode: bool | None = None
        self._set_aside: list[tuple[nn.Module, dict[str, Any]]] = []
        self._attrs: list[Callable[[], None]] = []     # what puts each set attribute back
        self._holding = holding()
        self._scope: Any = None

    @entering
    def __enter__(self) -> "HookSession":
        self._holding.__enter__()
        outer = active.current_scope()
        chain = (*outer, self) if outer and not outer[-1].exclusive else (self,)
        self._scope = active.hook_scope(chain)
        self._scope.__enter__()
        self.live = True
        return self

    @uninterruptible
    def __exit__(self, *exc: Any) -> None:
        self.close()
        self._holding.__exit__()

    @uninterruptible
    def close(self) -> None:
        """Remove everything; safe to call twice, and not cut short by Ctrl-C."""
        if not self.live:
            return
        self.live = False  # from here on, every hook of this session is inert
        while self._handles:
            self._handles.pop().remove()
        while self._forwards:
            module, had, previous, replacement = self._forwards.pop()
            _restore_forward(module, had, previous, replacement)
        while self._grads:
            param, grad = self._grads.pop()
            param.grad = grad
        if self._grad_mode is not None:
            torch.set_grad_enabled(self._grad_mode)
            self._grad_mode = None
        while self._set_aside:
            module, tables = self._set_aside.pop()
            module.__dict__.update(tables)
        while self._attrs:
            self._attrs.pop()()
        self._scope.__exit__(None, None, None)
        self._scope = None  # the scope's chain holds this session: no cycle left behind

    # -- what a session can change -------------------------------------------------------

    @uninterruptible
    def pre(self, module: nn.Module, fn: PreFn) -> None:
        """``fn(module, args, kwargs)`` before ``module`` runs; a returned pair replaces them."""
        box: list[Any] = []
        box.append(module.register_forward_pre_hook(self._guard(fn, box), with_kwargs=True))
        self._handles.append(box[0])

    @uninterruptible
    def post(self, module: nn.Module, fn: PostFn) -> None:
        """``fn(module, args, output)`` after ``module`` runs; a returned value replaces it."""
        box: list[Any] = []
        box.append(module.register_forward_hook(self._guard(fn, box)))
        self._handles.append(box[0])

    @uninterruptible
    def replace_forward(self, module: nn.Module, make: Callable[[Callable], Callable]) -> None:
        """``module.forward = make(original)`` for this session (the original outside it)."""
        had, previous, original = "forward" in module.__dict__, module.__dict__.get("forward"), \
            module.forward
        replacement = make(original)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not self.live:
                _restore_forward(module, had, previous, forward)
                return original(*args, **kwargs)
            if self not in active.current_scope():
                return original(*args, **kwargs)
            return replacement(*args, **kwargs)

        module.forward = forward
        self._forwards.append((module, had, previous, forward))

    @uninterruptible
    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """``obj.name = value`` for the session; the previous value comes back at its end (an
        attribute ``obj`` had from its class only is deleted again: nothing is left on it)."""
        self._attrs.append(undoer(obj, name))
        setattr(obj, name, value)

    @uninterruptible
    def keep_grads(self, module: nn.Module) -> None:
        """Every parameter's ``.grad`` is put back as it was when the session ends."""
        self._grads += [(p, None if p.grad is None else p.grad.clone())
                        for p in module.parameters()]

    @uninterruptible
    def set_aside_hooks(self, module: nn.Module) -> None:
        """Hooks that others put on ``module`` and its children are not called during the
        session (a dry run); they are back, unchanged, when it ends. Hooks marked
        ``keep_in_dry_run`` (a spliced dictionary's: part of the model) stay."""
        for sub in module.modules():
            tables = {name: sub.__dict__[name] for name in _HOOK_TABLES if name in sub.__dict__}
            self._set_aside.append((sub, tables))
            kept = {key for table in tables.values() for key, fn in table.items()
                    if getattr(fn, "keep_in_dry_run", False)}  # part of the model (a splice)
            for name, table in tables.items():
                sub.__dict__[name] = type(table)((k, v) for k, v in table.items() if k in kept)

    @uninterruptible
    def grad_mode(self, enabled: bool) -> None:
        """Autograd on or off for the session; the previous mode comes back at its end."""
        if self._grad_mode is None:
            self._grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(enabled)

    def _guard(self, fn: Callable, box: list[Any]) -> Callable:
        def hook(module: nn.Module, *rest: Any) -> Any:
            if not self.live:
                box[0].remove()
                return None
            if self not in active.current_scope():
                return None
            return fn(module, *rest)

        return hook


_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def _restore_forward(module: nn.Module, had: bool, previous: Any, replacement: Any) -> None:
    if module.__dict__.get("forward") is not replacement:
        return  # someone replaced it after us: theirs stays
    if had:
        module.forward = previous
    else:
        del module.__dict__["forward"]


def entry_point(fn: F) -> F:
    """For an operation of its own (a sweep, the lens): its forwards see none of the hooks of
    a trace it may be called from, one SIGINT handler serves all its hook sessions, and the
    grad mode is back as it was however it ends (its ``torch.no_grad()`` blocks included)."""

    @functools.wraps(fn)
    def own_scope(*args: Any, **kwargs: Any) -> Any:
        with _OwnScope():
            return fn(*args, **kwargs)

    return own_scope  # type: ignore[return-value]


class _OwnScope:
    def __init__(self) -> None:
        self.holding, self.scope = holding(), active.hook_scope(())
        self.grad_mode = torch.is_grad_enabled()

    @entering
    def __enter__(self) -> None:
        self.holding.__enter__()
        self.scope.__enter__()

    @uninterruptible
    def __exit__(self, *exc: Any) -> None:
        torch.set_grad_enabled(self.grad_mode)
        self.scope.__exit__()
        self.holding.__exit__()


def first_tensor(value: Any) -> torch.Tensor:
    """The activation in a module's output: the tensor itself, or the first of a tuple."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    return new


SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def tap(session: HookSession, module: nn.Module, before: bool, fn: SiteFn) -> None:
    """Call ``fn`` on the module's input tensor (``before``) or output tensor; a tensor it
    returns replaces that value."""
    if before:
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            key = input_key(args, kwargs)
            new = fn(args[0] if key == 0 else kwargs[key])
            return None if new is None else replace_input(args, kwargs, key, new)
        session.pre(module, pre)
    else:
        def post(mod: nn.Module, args: tuple, output: Any) -> Any:
            new = fn(first_tensor(output))
            return None if new is None else _replace_first(output, new)
        session.post(module, post)


def site_hooks(hooks: Iterable[tuple[nn.Module, str, SiteFn]]) -> HookSession:
    """A session with one :func:`tap` per ``(module, where, fn)``; ``where`` is one of the
    sweep sites' ``block_in``/``module_in`` (input) or ``block_out``/``module_out``.

    >>> with site_hooks([(block, "block_in", seen.append)]):   # doctest: +SKIP
    ...     model(**inputs)
    """
    return _SiteSession(list(hooks))


class _SiteSession(HookSession):
    def __init__(self, hooks: list[tuple[nn.Module, str, SiteFn]]) -> None:
        super().__init__()
        self.hooks = hooks

    @entering
    def __enter__(self) -> "HookSession":
        super().__enter__()
        try:
            for module, where, fn in self.hooks:
                tap(self, module, where in ("block_in", "module_in"), fn)
            self.hooks = []  # the session's hooks hold them now, until it closes
        except BaseException:
            self.__exit__()
            raise
        return self
