"""``%%trace MODEL [INPUT] --def NAME(ARGS)``: the cell becomes a function of the notebook.

Calling it runs the cell with the arguments bound (MODEL and INPUT are evaluated at each call,
so they may use the arguments too) and returns the :class:`~ipy_intervene.tracing.trace.TraceResult`;
the names the cell binds are in ``result.names``, the notebook's own names are untouched. The
cell is compiled once, under its own cell name, so an error in a call names the cell's line.

>>> %%trace model prompt --def steer(coef, latent=43)              # doctest: +SKIP
... model.transformer.h[2].sae.latents.output[:, -1, latent] *= coef
... logits = model.lm_head.output
>>> [steer(c).names["logits"][0, -1, mary] for c in (0.0, 1.0, 2.0)]  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import inspect
from typing import Any

from IPython.core.error import UsageError
from torch import nn

from ipy_intervene.compiler.compile import CompiledCell
from ipy_intervene.magics.command import TraceCommand
from ipy_intervene.magics.tracebacks import shorten
from ipy_intervene.model.envoys import Model
from ipy_intervene.model.loading import wrap
from ipy_intervene.tracing.trace import NO_INPUT, TraceResult, run_compiled


def as_model(value: Any, expr: str, magic: str) -> Model:
    """MODEL's value as an ``ii.Model`` (a raw ``nn.Module`` is wrapped)."""
    if isinstance(value, Model):
        return value
    if isinstance(value, nn.Module):
        return wrap(value)
    raise UsageError(f"{magic}: MODEL `{expr}` is a {type(value).__name__}; expected an "
                     "ii.Model (ii.load_model(...)) or a torch.nn.Module")


def take_def(line: str) -> tuple[str, str | None]:
    """``(line without the --def option, "NAME(ARGS)")``; the option's value may hold spaces,
    commas and nested brackets.

    >>> take_def('model p --def steer(coef, latent=(1, 2)) --grad')
    ('model p --grad', 'steer(coef, latent=(1, 2))')
    """
    at = _option_at(line)
    if at is None:
        return line, None
    start = at + len("--def")
    rest = line[start:].lstrip()
    open_at = rest.find("(")
    if open_at <= 0 or not rest[:open_at].strip().isidentifier():
        raise UsageError("%%trace --def needs NAME(ARGS), e.g. --def steer(coef, latent)")
    depth, end = 0, None
    for i, ch in enumerate(rest[open_at:], open_at):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0:
            end = i + 1
            break
    if end is None:
        raise UsageError(f"%%trace --def {rest!r}: the argument list is not closed")
    return (line[:at] + rest[end:]).strip().replace("  ", " "), rest[:end].strip()


def _option_at(line: str) -> int | None:
    quote, i = None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif line.startswith("--def", i) and (i == 0 or line[i - 1].isspace()) and \
                (i + 5 == len(line) or line[i + 5].isspace()):
            return i
        i += 1
    return None


def signature_of(spec: str, namespace: dict) -> tuple[str, inspect.Signature]:
    """The name and signature of ``NAME(ARGS)``; defaults evaluated now, in ``namespace``
    (as Python evaluates a ``def``'s defaults)."""
    try:
        node = ast.parse(f"def {spec}: pass").body[0]
    except SyntaxError as exc:
        raise UsageError(f"%%trace --def {spec}: not a function header ({exc.msg})") from None
    assert isinstance(node, ast.FunctionDef)
    params = []
    a = node.args
    positional = [*a.posonlyargs, *a.args]
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    kinds = [inspect.Parameter.POSITIONAL_ONLY] * len(a.posonlyargs) + \
        [inspect.Parameter.POSITIONAL_OR_KEYWORD] * len(a.args)
    for arg, default, kind in zip(positional, defaults, kinds):
        params.append(inspect.Parameter(arg.arg, kind, default=_value(default, namespace, spec)))
    if a.vararg is not None or a.kwarg is not None:
        raise UsageError(f"%%trace --def {spec}: *args and **kwargs are not supported; name "
                         "each argument")
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        params.append(inspect.Parameter(arg.arg, inspect.Parameter.KEYWORD_ONLY,
                                        default=_value(default, namespace, spec)))
    return node.name, inspect.Signature(params)


def _value(node: ast.expr | None, namespace: dict, spec: str) -> Any:
    if node is None:
        return inspect.Parameter.empty
    try:
        return eval(compile(ast.Expression(node), "<--def>", "eval"), namespace)
    except Exception as exc:
        raise UsageError(f"%%trace --def {spec}: the default `{ast.unparse(node)}` failed: "
                         f"{type(exc).__name__}: {exc}") from None


class TracedCell:
    """A ``%%trace`` cell as a function: ``cell(*args, **kwargs) -> TraceResult``."""

    def __init__(self, name: str, signature: inspect.Signature, shell: Any,
                 command: TraceCommand, cell: CompiledCell, filename: str, title: str,
                 options: dict[str, Any]) -> None:
        self.__name__ = self.__qualname__ = name
        self.__signature__ = signature
        self.shell, self.command, self.cell = shell, command, cell
        self.filename, self.title, self.options = filename, title, options
        self.__doc__ = f"The %%trace cell of {title} run with {name}{signature}; returns its TraceResult."

    def __call__(self, *args: Any, **kwargs: Any) -> TraceResult:
        __tracebackhide__ = True
        try:
            bound = self.__signature__.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.__name__}{self.__signature__}: {exc}") from None
        bound.apply_defaults()
        ns = dict(self.shell.user_ns)  # the cell's names stay in the result
        ns.update(bound.arguments)
        model = as_model(_eval(self.command.model, ns, "MODEL"), self.command.model, "%%trace")
        input_ = NO_INPUT if self.command.input is None else \
            _eval(self.command.input, ns, "INPUT")
        try:
            return run_compiled(model, self.cell, ns, input_, **self.options)
        except Exception as exc:
            shorten(exc, self.filename, self.title)
            raise

    def __repr__(self) -> str:
        return f"<traced cell {self.__name__}{self.__signature__} of {self.title}>"


def _eval(expr: str, ns: dict, role: str) -> Any:
    try:
        return eval(expr, ns)
    except Exception as exc:
        raise UsageError(f"%%trace: {role} `{expr}` failed: {type(exc).__name__}: {exc}") \
            from None


def check_options(args: Any) -> dict[str, Any]:
    """The options a defined cell keeps (``--generate``, ``--ignore-eos``, ``--grad``)."""
    extra = [f"--{o.replace('_', '-')}" for o in ("graph", "dry_run", "out", "quiet")
             if getattr(args, o, None)]
    if extra:
        raise UsageError(f"%%trace --def: {', '.join(extra)} do not go with --def (the "
                         "function returns the TraceResult); it keeps --generate, "
                         "--ignore-eos, --grad and the sampling options")
    return {"generate": args.generate, "ignore_eos": args.ignore_eos, "grad": args.grad,
            "dry_run": False, "generate_options": getattr(args, "generate_options", None)}
