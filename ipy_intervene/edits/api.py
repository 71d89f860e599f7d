"""Edits that last: ``ii.edit``, ``ii.edits``, ``ii.clear_edits``.

An edit is a trace cell whose interventions apply at every later forward of the edited
model: any prompt or batch, every generation step, sweeps, caches and other libraries that
call ``NAME.module``. ``ii.edit`` returns a new ``ii.Model`` on the same weights (a shallow
clone of the module tree, :mod:`ipy_intervene.edits.clone`: no weight is copied, and the
original model never sees the edit), or, with ``inplace=True``, the model itself.

Values the cell reads from the notebook (a steering vector, a coefficient) are captured when
the edit is made: tensors are copied (one that requires grad, a trained vector, is kept
itself), other values deep-copied where they can be; modules and functions are kept as they
are. Changing the notebook's value afterwards does not change the edit; make a new edit.

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> ablated = ii.edit(model, "model.transformer.h[0].mlp.output[:] = 0", name="no_mlp0")
>>> [e.name for e in ii.edits(ablated)], ii.edits(model)
(['no_mlp0'], [])
"""

from __future__ import annotations

import ast
import copy
import inspect
import itertools
import textwrap
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ipy_intervene.arch import attention
from ipy_intervene.compiler.compile import CompiledCell, compile_cell
from ipy_intervene.compiler.graph import InterventionGraph
from ipy_intervene.compiler.validate import HookPlan, validate
from ipy_intervene.edits.clone import shallow_clone
from ipy_intervene.edits.hooks import EditHooks
from ipy_intervene.errors import CellSyntaxError, InterventionError, SiteError
from ipy_intervene.infra import active
from ipy_intervene.infra.hooks import entry_point, undoer
from ipy_intervene.model.envoys import Envoy, Model
from ipy_intervene.model.loading import wrap

_registry: "weakref.WeakKeyDictionary[nn.Module, list[Edit]]" = weakref.WeakKeyDictionary()
_serials = itertools.count(1)
NO_INPUT = object()


@dataclass(eq=False)
class Edit:
    """One edit on one model: its cell, the values it captured and its hooks.

    ``name``, ``where`` (the cell or function it was written in), ``source`` (the cell),
    ``captured`` (the notebook values it took, by name).
    """

    name: str
    source: str
    filename: str
    where: str
    model_name: str
    captured: dict[str, Any]
    model: Model = field(repr=False, default=None)
    cell: CompiledCell = field(repr=False, default=None)
    graph: InterventionGraph = field(repr=False, default=None)
    plan: HookPlan = field(repr=False, default=None)
    hooks: EditHooks = field(repr=False, default=None)
    undo: list[Callable[[], None]] = field(repr=False, default_factory=list)
    serial: int = 0

    @property
    def ns(self) -> dict[str, Any]:
        """The namespace the cell runs in: the captured values and the edited model."""
        return {**self.captured, self.model_name: self.model}

    def check_alone(self, module: nn.Module) -> None:
        """A module of the edit called outside a forward of the whole model (ad hoc, from a
        cell; every sweep of an edited model runs whole forwards): the edit can run on that
        call alone only if it reads and changes that module alone, at positions counted from
        the end (a call does not say where each prompt starts)."""
        ids = {id(m) for m in (*self.plan.pre.values(), *self.plan.out.values())}
        path = self.model._name_of(module) or type(module).__name__
        if len(ids) > 1:
            raise SiteError(
                f"the edit `{self.name}` ({self.where}) reads or changes {len(ids)} modules; "
                f"model.{path} was called on its own, outside a forward of the whole model "
                "(called ad hoc), where the other modules "
                "do not run with it. Make one edit per module (edits compose), or run the "
                "whole model")
        line = fixed_position(self.source)
        if line is not None:
            raise SiteError(
                f"the edit `{self.name}` ({self.where}, line {line}) indexes a position "
                f"counted from the start; model.{path} was called on its own, outside a "
                "forward of the whole model (called ad hoc, perhaps on some positions "
                "only), where the start of each prompt "
                "is not known. Count positions from the end ([:, -1]) or edit all of them")

    def remove(self) -> None:
        self.hooks.remove()
        while self.undo:
            self.undo.pop()()

    def __repr__(self) -> str:
        names = ", ".join(self.captured) or "nothing"
        return f"<Edit {self.name!r} of {self.where}: captured {names}>"


def edit(model: Any, cell: str | Callable[..., Any], *, name: str | None = None,
         inplace: bool = False, namespace: dict[str, Any] | None = None,
         model_name: str = "model", input: Any = NO_INPUT, filename: str | None = None,
         where: str | None = None) -> Model:
    """The model with ``cell``'s interventions applied at every later forward.

    ``cell``: trace-cell code (one prompt's view: no ``tracer.invoke``), reading the
    notebook values in ``namespace``; or a function ``fn(model)`` whose body is that code
    (its globals and closure are the namespace). Returns a new ``ii.Model`` on the same
    weights, or ``model`` itself with ``inplace=True``. ``input``: run the edited model once
    on it now, so that an error in the cell shows before the edit is kept.

    >>> steered = ii.edit(model, "model.transformer.h[1].output[:, -1] += 4 * vec",
    ...                   name="steer", namespace={"vec": vec})          # doctest: +SKIP
    >>> steered.module.generate(**inputs)                                 # doctest: +SKIP
    """
    if active.current_trace() is not None:
        raise InterventionError("ii.edit changes a model's hooks for good: call it between "
                                "cells, not inside a running trace")
    model = wrap(model)
    source, filename, where, name, model_name, namespace = _cell_of(
        cell, name, filename, where, model_name, namespace)
    compiled = _compile(source, model_name, filename)
    target = model if inplace else _clone(model)
    _check_map(target)
    if not inplace:
        for earlier in edits(model):   # the clone carries the model's edits, in order
            again = {k: _take(v, model, target) for k, v in earlier.captured.items()}
            _install(target, earlier.source, earlier.filename, earlier.where, earlier.name,
                     earlier.model_name, again, compile_=earlier.cell)
    captured = capture(compiled, source, namespace, model_name, model, target)
    made = _install(target, source, filename, where, name, model_name, captured,
                    compile_=compiled)
    if input is not NO_INPUT:
        _try(target, made, input)
    return target


def _clone(model: Model) -> Model:
    """The edited model: a shallow clone, its splices (``ii.attach``) routed through its own
    copies of them, as the original's are through theirs."""
    from ipy_intervene.features.splice import _route, attached, module_at

    target = Model(shallow_clone(model.module), model.tokenizer)
    for splice in attached(target).values():
        parent = module_at(target.module, splice.target_path)
        splice._handle = parent.register_forward_hook(_route(splice), with_kwargs=True)
    return target


def edits(model: Any) -> list[Edit]:
    """The model's edits, in the order they apply.

    >>> [e.name for e in ii.edits(steered)]                              # doctest: +SKIP
    ['steer']
    """
    return list(_registry.get(_root(model), ()))


def clear_edits(model: Any) -> None:
    """Remove every edit of ``model``: no hook of theirs is left, and the model computes
    what it did before them.

    >>> ii.clear_edits(model)                                             # doctest: +SKIP
    """
    if active.current_trace() is not None:
        raise InterventionError("ii.clear_edits changes a model's hooks: call it between "
                                "cells, not inside a running trace")
    root = _root(model)
    for made in reversed(_registry.pop(root, [])):
        made.remove()


def edit_keys(module: nn.Module) -> tuple[tuple[str, int], ...]:
    """Which edits a model has now (a different tuple for each edit set)."""
    return tuple((e.name, e.serial) for e in _registry.get(module, ()))


def is_edit_hook(fn: Any) -> bool:
    """Whether a hook function is one of an edit's (the sweep memo keys the edit set)."""
    return getattr(fn, "_ii_edit", None) is not None


# -- making an edit ---------------------------------------------------------------------------

def _install(target: Model, source: str, filename: str, where: str, name: str,
             model_name: str, captured: dict[str, Any], *, compile_: CompiledCell) -> Edit:
    made = Edit(name, source, filename, where, model_name, captured, target, compile_,
                compile_.fresh_graph(), serial=next(_serials))
    made.plan = validate(compile_, target, made.graph)
    made.hooks = EditHooks(made, target.module)
    try:
        if made.plan.uses_attention_sites():
            attention.use_sites(_Lasting(made.undo), target.module)
        made.hooks.install(made.plan)
    except BaseException:
        made.remove()
        raise
    _registry.setdefault(target.module, []).append(made)
    return made


@entry_point
def _try(target: Model, made: Edit, input: Any) -> None:
    """One forward of the edited model on ``input``; if it fails, the edit is undone."""
    try:
        with torch.no_grad():
            target.module(**target.prepare([input]).kwargs)
    except BaseException:
        made.remove()
        kept = _registry.get(target.module, [])
        if made in kept:
            kept.remove(made)
        raise


def _check_map(target: Model) -> None:
    """The site map's one-time check runs before any edit hook is on the model (an edit
    changes what the check compares); models of no known family have none."""
    from ipy_intervene.arch.sites import adapter_for

    try:
        adapter_for(target)
    except Exception:  # noqa: BLE001 - no map (or a failing one): analyses say so themselves
        pass


class _Lasting:
    """What ``attention.use_sites`` asks of a hook session, for as long as the edit lasts."""

    def __init__(self, undo: list[Callable[[], None]]) -> None:
        self.undo = undo

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        self.undo.append(undoer(obj, name))
        setattr(obj, name, value)

    def post(self, module: nn.Module, fn: Any) -> None:
        def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            return fn(mod, args, output)

        hook._ii_edit = True   # the sweep memo tells an edit's hooks from others
        self.undo.append(module.register_forward_hook(hook).remove)


def _compile(source: str, model_name: str, filename: str) -> CompiledCell:
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id == "tracer" and node.attr in ("invoke", "stop", "output"):
            why = {"invoke": "another prompt's activations (cross-prompt patching) do not "
                             "exist there: at a later forward there is no other prompt. "
                             "Write the cell for one prompt, without tracer.invoke",
                   "stop": "it runs to its end", "output": "the logits are what the edited "
                   "model returns; read model.lm_head.output in the edit instead"}[node.attr]
            raise CellSyntaxError(f"tracer.{node.attr} does not go in an edit: an edit applies "
                                  f"at every later forward, each prompt on its own, so {why}",
                                  line=node.lineno)
    cell = compile_cell(source, model_expr=model_name, has_input=True, filename=filename)
    for site in cell.graph.sites:
        if site.attr == "skip":
            raise SiteError("`.skip(value)` does not go in an edit: assign the module's output "
                            "instead (`m.output = value`)", line=site.line)
    return cell


def _cell_of(cell: Any, name: str | None, filename: str | None, where: str | None,
             model_name: str, namespace: dict | None) -> tuple:
    """(source, filename, where, name, model name, namespace) of a cell text or function."""
    if isinstance(cell, str):
        filename = filename or f"<edit {name or 'edit'}>"
        return (cell, filename, where or filename, name or "edit", model_name,
                dict(namespace or {}))
    if not callable(cell):
        raise InterventionError(f"ii.edit takes the cell as a string or a function "
                                f"fn(model); got {type(cell).__name__}")
    try:
        lines, start = inspect.getsourcelines(cell)
    except (OSError, TypeError):
        raise InterventionError(f"ii.edit: the source of {cell!r} is not available; give "
                                "the cell as a string") from None
    node = ast.parse(textwrap.dedent("".join(lines))).body[0]
    if not isinstance(node, ast.FunctionDef) or len(node.args.args) != 1:
        raise InterventionError("ii.edit takes a function of one argument, the model: "
                                "def steer(model): ...")
    body = textwrap.dedent("".join(lines[node.body[0].lineno - 1:]))
    source = "\n" * (start + node.body[0].lineno - 2) + body   # lines as in the file
    ns = dict(cell.__globals__)
    ns.update(inspect.getclosurevars(cell).nonlocals)
    ns.update(namespace or {})
    file = filename or inspect.getsourcefile(cell) or "<edit>"
    return (source, file, where or f"{cell.__qualname__}", name or cell.__name__,
            node.args.args[0].arg, ns)


def capture(cell: CompiledCell, source: str, namespace: dict[str, Any], model_name: str,
            model: Model, target: Model) -> dict[str, Any]:
    """The notebook values the cell reads, taken now (see the module docstring). An envoy
    of the model being edited becomes the edited model's envoy at the same path."""
    names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    taken = {}
    for name in sorted(names - {model_name, "tracer"}):
        if name in namespace:
            taken[name] = _take(namespace[name], model, target)
    return taken


def _take(value: Any, model: Model, target: Model) -> Any:
    if isinstance(value, Envoy):
        if value._root is model.module and value.path:
            return _envoy_at(target, value.path)
        return value
    if isinstance(value, torch.Tensor):
        return value if value.requires_grad else value.detach().clone()
    if isinstance(value, (nn.Module, type)) or callable(value) or inspect.ismodule(value):
        return value
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - a value that cannot be copied is kept as it is
        return value


def _envoy_at(model: Model, path: str) -> Envoy:
    envoy: Envoy = model
    for part in path.replace("[", ".[").split("."):
        if not part:
            continue
        envoy = envoy[ast.literal_eval(part[1:-1])] if part.startswith("[") else \
            getattr(envoy, part)
    return envoy


def _root(model: Any) -> nn.Module:
    module = getattr(model, "module", model)
    if not isinstance(module, nn.Module):
        raise InterventionError(f"expected an ii.Model or a torch.nn.Module; got "
                                f"{type(model).__name__}")
    return module


def fixed_position(source: str) -> int | None:
    """The line of the first subscript whose second index is a position counted from the
    start (``x[:, 3]``, ``x[:, 2:5]``), or None.

    >>> fixed_position("a = 1\\nm.output[:, 3] = 0"), fixed_position("m.output[:, -1] = 0")
    (2, None)
    """
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Tuple) and \
                len(node.slice.elts) >= 2 and _from_start(node.slice.elts[1]):
            return node.lineno
    return None


def _from_start(item: ast.expr) -> bool:
    def start(x: ast.expr | None) -> bool:
        return isinstance(x, ast.Constant) and isinstance(x.value, int) and x.value >= 0

    if isinstance(item, ast.Slice):
        return start(item.lower) and item.lower.value > 0 or start(item.upper)
    return start(item)
