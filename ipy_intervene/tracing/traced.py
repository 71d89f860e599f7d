"""``@ii.traced(model, INPUT)``: a function whose body is a trace cell. Each call runs the body
against one forward with the arguments bound and returns the
:class:`~ipy_intervene.tracing.trace.TraceResult` (the names the body binds are in ``result.names``).
The Python counterpart of ``%%trace MODEL INPUT --def NAME(ARGS)``, for scripts and modules.

>>> @ii.traced(model, prompt)                                       # doctest: +SKIP
... def steer(coef, latent=43):
...     model.transformer.h[2].sae.latents.output[:, -1, latent] *= coef
...     logits = model.lm_head.output
>>> [steer(c).names["logits"][0, -1].argmax() for c in (0.0, 1.0, 4.0)]   # doctest: +SKIP

The body is compiled once, at its own file's line numbers, so errors name the function's
lines. It sees the module's globals and its arguments (not an enclosing function's locals);
``model`` in the body is the traced model (``model_name=`` for another name). ``input`` may
be a callable of the arguments (``input=lambda i, **_: prompts[i]``).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Any, Callable

from ipy_intervene.compiler.compile import compile_cell
from ipy_intervene.errors import InputError
from ipy_intervene.model.loading import wrap
from ipy_intervene.tracing.trace import NO_INPUT, TraceResult, run_compiled


def traced(model: Any, input: Any = NO_INPUT, *, model_name: str = "model", grad: bool = False,
           generate: int | None = None, ignore_eos: bool = False
           ) -> Callable[[Callable[..., Any]], Callable[..., TraceResult]]:
    """Decorate a function whose body is trace-cell code; see the module docstring."""
    wrapped = wrap(model)

    def decorate(fn: Callable[..., Any]) -> Callable[..., TraceResult]:
        source, filename = _body(fn)
        cell = compile_cell(source, model_expr=model_name, has_input=input is not NO_INPUT,
                            filename=filename)
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> TraceResult:
            __tracebackhide__ = True
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            ns = dict(fn.__globals__)
            ns.update(bound.arguments)
            ns[model_name] = wrapped
            value = input(**bound.arguments) if callable(input) else input
            return run_compiled(wrapped, cell, ns, value, generate=generate, grad=grad,
                                dry_run=False, ignore_eos=ignore_eos)

        return call

    return decorate


def _body(fn: Callable[..., Any]) -> tuple[str, str]:
    """The function's body as cell source, padded so its lines keep their file numbers."""
    try:
        lines, start = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        raise InputError(f"@ii.traced: the source of {getattr(fn, '__name__', fn)!r} is not "
                         "available (a lambda or a function typed at a plain python prompt); "
                         "define it in a file or a notebook cell") from None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        raise InputError(f"@ii.traced decorates a plain function (def); got "
                         f"{type(node).__name__}")
    first = node.body[0].lineno  # 1-based, within ``lines``
    if first == node.lineno:  # `def f(x): body` on one line
        raise InputError("@ii.traced: put the body on its own lines, under the def")
    body = textwrap.dedent("".join(lines[first - 1:]))
    filename = inspect.getsourcefile(fn) or fn.__code__.co_filename
    return "\n" * (start + first - 2) + body, filename
