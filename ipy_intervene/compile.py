"""Cell AST -> :class:`InterventionGraph` + code objects for each invoke.

The compiler owns the cell text. It splits the cell into the code before the first invoke,
one body per invoke and the code after the last one, and rewrites every module site it can
see (``model.transformer.h[2].output``, ``m.output = v``, ``m.output[:, -1] = 0``,
``m.skip(v)``, ``model.lm_head(x)``, ``tracer.output``) into a call on the runtime bridge
``__ii__`` that carries the site's node id. Control flow is instrumented
(``__ii__.branch``/``__ii__.loop``) so the graph can say what ran. Names that flow between
invokes get ``__ii__.wait_for``/``__ii__.bound`` barriers.

This module is the entry point (:func:`compile_cell`) and owns the cell's structure (the
invoke split); the rewriting walk lives in :mod:`ipy_intervene.rewrite`, and the names both
share (``__ii__``, site attributes, module paths, name analysis) in :mod:`ipy_intervene.syntax`.

>>> cell = compile_cell("h = model.transformer.h[0].output", has_input=True)
>>> [s.label for s in cell.graph.sites], cell.graph.published
(['transformer.h[0].output'], ['h'])
"""

from __future__ import annotations

import ast
import copy
import functools
from dataclasses import dataclass, field
from types import CodeType
from typing import Callable

from ipy_intervene.errors import CellSyntaxError
from ipy_intervene.graph import InterventionGraph
from ipy_intervene.habits import site_roots
from ipy_intervene.rewrite import _GraphBuilder
from ipy_intervene.namespace import bound_names
from ipy_intervene.syntax import (BRIDGE, INTERNAL_NAMES, SITE_ATTRS, TRACER, Part, bridge_call, format_path, locate,
                                  statement_names)

__all__ = ["BRIDGE", "INTERNAL_NAMES", "SITE_ATTRS", "TRACER", "CompiledCell", "InvokeCode",
           "Part", "compile_cell", "format_path", "parse_cell", "split_invokes",
           "statement_names"]


@dataclass
class InvokeCode:
    """One ``with tracer.invoke(X):`` block (or the whole cell when INPUT is on the line)."""

    index: int
    line: int
    input_code: CodeType | None
    body: CodeType
    params: tuple[str, ...] = ()   # an invoke loop's targets: ``body`` is then a function's code


@dataclass
class CompiledCell:
    graph: InterventionGraph
    before: CodeType | None
    invokes: list[InvokeCode]
    after: CodeType | None
    filename: str
    site_parts: dict[int, tuple[Part, ...]]
    setup: CodeType | None = None  # evaluates each invoke's INPUT: ``__ii__.add_invoke(...)``
    model_expr: str = "model"
    other_roots: list[tuple[str, int]] = field(default_factory=list)  # habits.site_roots

    def fresh_graph(self) -> InterventionGraph:
        """A copy of the graph for one run to annotate."""
        return copy.deepcopy(self.graph)


def compile_cell(source: str, *, model_expr: str = "model", has_input: bool,
                 filename: str = "<cell>",
                 transform_ast: Callable[[ast.Module], ast.Module] | None = None) -> CompiledCell:
    """Compile a trace cell. ``has_input``: INPUT was given on the magic line.

    Raises :class:`CellSyntaxError` (with the cell line) for invalid Python or an invalid
    invoke structure. Results are cached by (source, model_expr, has_input, filename) when
    no ``transform_ast`` is given.
    """
    if transform_ast is None:
        return _compile_cached(source, model_expr, has_input, filename)
    return _compile(source, model_expr, has_input, filename, transform_ast)


@functools.lru_cache(maxsize=256)
def _compile_cached(source: str, model_expr: str, has_input: bool, filename: str) -> CompiledCell:
    return _compile(source, model_expr, has_input, filename, None)


def _compile(source, model_expr, has_input, filename, transform_ast) -> CompiledCell:
    tree = parse_cell(source, filename)
    if transform_ast is not None:
        tree = transform_ast(tree)
    roots = site_roots(tree, model_expr)  # before the rewrite changes the tree
    model_node = _parse_model_expr(model_expr)
    before, invokes, after = split_invokes(tree, has_input)
    graph = InterventionGraph(source=source)
    loops = [None if loop is None else _targets(loop) for *_, loop in invokes]
    own = [for_targets(block[2]) | (loops[i] or set()) for i, block in enumerate(invokes)]
    builder = _GraphBuilder(graph, source, model_node, [block[2] for block in invokes], loops,
                            own)
    cell_region = graph.add_region("cell", line=1, label="cell")
    before_code = builder.part(before, "before", "before the forward", cell_region, None, filename)
    invoke_codes = []
    for index, (line, input_expr, body, loop) in enumerate(invokes):
        label = f"invoke {index}" if loop is None else f"invoke {index} (for each {_unparse_target(loop)})"
        region = graph.add_region("invoke", line=line, label=label, parent=cell_region)
        graph.invokes.append(region)
        if has_input:  # one invoke: the cell's own code, nothing to interleave with
            body_code, params = builder.block_code(body, region, index, filename), ()
        else:
            _reject_return_and_yield(body)
            params = tuple(sorted(loops[index] or ()))
            body_code = builder.invoke_code(body, region, index, filename, list(params),
                                            _globals_of(body, filename), loop or body[0])
        input_code = None
        if input_expr is not None:
            input_code = compile(ast.Expression(body=input_expr), filename, "eval")
        invoke_codes.append(InvokeCode(index, line, input_code, body_code, params))
    after_code = builder.part(after, "after", "after the forward", cell_region, None, filename)
    builder.finish()
    setup = None if has_input else _setup_code(invokes, filename)
    return CompiledCell(graph, before_code, invoke_codes, after_code, filename, builder.parts,
                        setup, model_expr, roots)


def _targets(loop: ast.For) -> set[str]:
    return {n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)}


def for_targets(body: list[ast.stmt]) -> set[str]:
    """Names bound as ``for`` targets in ``body`` (outside nested functions): each invoke's own."""
    found: set[str] = set()
    todo: list[ast.AST] = list(body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, (ast.For, ast.AsyncFor)):
            found |= _targets(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def _unparse_target(loop: ast.For) -> str:
    return f"{ast.unparse(loop.target)} in {ast.unparse(loop.iter)}"


def _globals_of(body: list[ast.stmt], filename: str) -> set[str]:
    """The names a loop body binds, as the rest of the cell would bind them (globals)."""
    return set(bound_names(ast.unparse(ast.Module(body=body, type_ignores=[])), filename))


def _setup_code(invokes: list, filename: str) -> CodeType:
    """``__ii__.add_invoke(k, INPUT, targets)`` for each invoke, inside its ``for`` if any."""
    stmts: list[ast.stmt] = []
    for index, (line, input_expr, _, loop) in enumerate(invokes):
        names = sorted(_targets(loop)) if loop is not None else []
        targets = ast.Dict([ast.Constant(n) for n in names],
                           [ast.Name(n, ast.Load()) for n in names]) if loop else ast.Constant(None)
        call = bridge_call("add_invoke", [ast.Constant(index), input_expr, targets], input_expr)
        stmt: ast.stmt = locate(ast.Expr(call), input_expr)
        if loop is not None:
            stmt = locate(ast.For(target=loop.target, iter=loop.iter, body=[stmt], orelse=[]), loop)
        stmts.append(stmt)
    module = ast.Module(body=stmts, type_ignores=[])
    return compile(ast.fix_missing_locations(module), filename, "exec")


def parse_cell(source: str, filename: str = "<cell>") -> ast.Module:
    try:
        return ast.parse(source, filename)
    except SyntaxError as exc:
        text = (exc.text or "").rstrip("\n")
        caret = " " * max(0, (exc.offset or 1) - 1 - (len(text) - len(text.lstrip()))) + "^"
        raise CellSyntaxError(f"{exc.msg}\n    {text.strip()}\n    {caret}",
                              line=exc.lineno) from None


def _parse_model_expr(model_expr: str) -> ast.expr:
    try:
        return ast.parse(model_expr.strip(), mode="eval").body
    except SyntaxError:
        raise CellSyntaxError(f"the MODEL expression {model_expr!r} is not valid Python") from None


# -- cell structure -----------------------------------------------------------------------

def _invoke_input(stmt: ast.stmt) -> ast.expr | None:
    """The X of ``with tracer.invoke(X):``, else None."""
    if not isinstance(stmt, ast.With) or len(stmt.items) != 1:
        return None
    call = stmt.items[0].context_expr
    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and call.func.attr == "invoke" and isinstance(call.func.value, ast.Name)
            and call.func.value.id == TRACER):
        if len(call.args) != 1 or call.keywords or stmt.items[0].optional_vars is not None:
            raise CellSyntaxError("write an invoke as `with tracer.invoke(INPUT):` "
                                  "(one INPUT, no `as`)", line=stmt.lineno)
        return call.args[0]
    return None


def _is_noop(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Pass) or (
        isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))


def _invoke_loop(stmt: ast.stmt) -> ast.expr | None:
    """The X of ``for T in ITER: with tracer.invoke(X): ...`` (an invoke per item), else None."""
    if not isinstance(stmt, ast.For):
        return None
    body = [s for s in stmt.body if not _is_noop(s)]
    invokes = [s for s in body if _invoke_input(s) is not None]
    if not invokes:
        return None
    if len(body) != 1:
        raise CellSyntaxError("the body of an invoke loop is one `with tracer.invoke(X):` block "
                              "and nothing else: move the other statements into the block",
                              line=stmt.lineno)
    if stmt.orelse:
        raise CellSyntaxError("an invoke loop cannot have an `else`", line=stmt.lineno)
    return _invoke_input(body[0])


def _reject_return_and_yield(body: list[ast.stmt]) -> None:
    todo: list[ast.AST] = list(body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, (ast.Return, ast.Yield, ast.YieldFrom, ast.Await)):
            raise CellSyntaxError(f"`{ast.unparse(node).split()[0]}` outside a function",
                                  line=node.lineno)
        todo.extend(ast.iter_child_nodes(node))


def _invoke_block(stmt: ast.stmt) -> tuple[ast.expr, list[ast.stmt], ast.For | None] | None:
    """(INPUT, body, loop) of an invoke block or an invoke loop at the top of the cell."""
    x = _invoke_input(stmt)
    if x is not None:
        return x, stmt.body, None
    x = _invoke_loop(stmt)
    if x is not None:
        inner = next(s for s in stmt.body if not _is_noop(s))
        return x, inner.body, stmt
    return None


def split_invokes(tree: ast.Module, has_input: bool):
    """(before, [(line, input_expr, body, loop)], after) of a cell; ``loop`` is the ``for``
    statement of an invoke loop (one invoke per item), else None."""
    top = [(i, _invoke_block(s)) for i, s in enumerate(tree.body)]
    positions = [i for i, x in top if x is not None]
    _reject_nested_invokes(tree, set(positions))
    if has_input:
        if positions:
            raise CellSyntaxError("INPUT is given on the magic line and the cell also has "
                                  "`tracer.invoke` blocks: use one or the other",
                                  line=tree.body[positions[0]].lineno)
        return [], [(1, None, tree.body, None)], []
    if not positions:
        raise CellSyntaxError("no INPUT on the magic line and no `with tracer.invoke(INPUT):` "
                              "block in the cell: write `%%trace model \"a prompt\"` or add "
                              "invoke blocks")
    first, last = positions[0], positions[-1]
    for stmt in tree.body[first:last + 1]:
        if _invoke_block(stmt) is None and not _is_noop(stmt):
            raise CellSyntaxError("statements between invoke blocks are not supported: move "
                                  "them before the first invoke or after the last one",
                                  line=stmt.lineno)
    invokes = [(_line(tree.body[i], b), b[0], b[1], b[2]) for i, b in top if b is not None]
    return tree.body[:first], invokes, tree.body[last + 1:]


def _line(stmt: ast.stmt, block: tuple) -> int:
    loop = block[2]
    return next(s for s in loop.body if not _is_noop(s)).lineno if loop is not None else stmt.lineno


def _reject_nested_invokes(tree: ast.Module, top_level: set[int]) -> None:
    top_nodes = {id(tree.body[i]) for i in top_level}
    top_nodes |= {id(s) for i in top_level if isinstance(tree.body[i], ast.For)
                  for s in tree.body[i].body}
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and id(node) not in top_nodes and _invoke_input(node):
            raise CellSyntaxError("`with tracer.invoke(...)` must be at the top level of the "
                                  "cell, not inside another block", line=node.lineno)
