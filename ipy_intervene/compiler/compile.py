"""Cell AST -> :class:`InterventionGraph` + code objects for each invoke.

The compiler owns the cell text. It splits the cell into the set-up before the forward (the
statements up to the last invoke block, each block replaced by the call that registers it),
one body per invoke block and the code after the last one (see :mod:`ipy_intervene.compiler.invokes`
for the rule that says whose names are whose), and rewrites every module site it can
see (``model.transformer.h[2].output``, ``m.output = v``, ``m.output[:, -1] = 0``,
``m.skip(v)``, ``model.lm_head(x)``, ``tracer.output``) into a call on the runtime bridge
``__ii__`` that carries the site's node id. Control flow is instrumented
(``__ii__.branch``/``__ii__.loop``) so the graph can say what ran. Names that flow between
invokes get ``__ii__.wait_for``/``__ii__.bound`` barriers.

This module is the entry point (:func:`compile_cell`); the rewriting walk lives in :mod:`ipy_intervene.compiler.rewrite`, and the names both
share (``__ii__``, site attributes, module paths, name analysis) in :mod:`ipy_intervene.compiler.syntax`.

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

from ipy_intervene.compiler.graph import InterventionGraph
from ipy_intervene.compiler.invokes import Block, find_blocks, name_rules
from ipy_intervene.compiler.rewrite import _GraphBuilder
from ipy_intervene.compiler.syntax import (
    BRIDGE,
    INTERNAL_NAMES,
    SITE_ATTRS,
    TRACER,
    Part,
    bridge_call,
    child_blocks,
    format_path,
    locate,
    statement_names,
)
from ipy_intervene.errors import CellSyntaxError
from ipy_intervene.habits.explain import site_roots

__all__ = ["BRIDGE", "INTERNAL_NAMES", "SITE_ATTRS", "TRACER", "CompiledCell", "InvokeCode",
           "Part", "compile_cell", "format_path", "parse_cell", "statement_names"]


@dataclass
class InvokeCode:
    """One ``with tracer.invoke(X):`` block (or the whole cell when INPUT is on the line)."""

    index: int
    line: int
    body: CodeType                 # module code (INPUT on the line), else a function's code
    params: tuple[str, ...] = ()   # names captured when the invoke is registered
    own: frozenset[str] = frozenset()  # the names it binds: published after the forward
    shared: frozenset[str] = frozenset()  # names other invokes bind or fill during the forward


@dataclass
class CompiledCell:
    graph: InterventionGraph
    before: CodeType | None        # runs before the forward; registers the invokes
    invokes: list[InvokeCode]
    after: CodeType | None
    filename: str
    site_parts: dict[int, tuple[Part, ...]]
    model_expr: str = "model"
    other_roots: list[tuple[str, int]] = field(default_factory=list)  # habits.site_roots
    varying: tuple[str, ...] = ()  # set-up names whose value differs between invokes

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
    setup, blocks, after = find_blocks(tree, has_input)
    graph = InterventionGraph(source=source)
    cell_region = graph.add_region("cell", line=1, label="cell")
    if has_input:  # one invoke: the cell's own code, nothing to interleave with
        builder = _GraphBuilder(graph, source, model_node)
        region = graph.add_region("invoke", line=1, label="invoke 0", parent=cell_region)
        graph.invokes.append(region)
        invokes = [InvokeCode(0, 1, builder.block_code(after, region, 0, filename))]
        builder.finish()
        return CompiledCell(graph, None, invokes, None, filename, builder.parts, model_expr,
                            roots)
    rules, varying = name_rules(blocks, setup)
    builder = _GraphBuilder(graph, source, model_node, rules)
    for block in blocks:  # each block becomes ``__ii__.add_invoke(k, INPUT)`` in the set-up
        _replace(setup, block.node, locate(ast.Expr(bridge_call(
            "add_invoke", [ast.Constant(block.index), block.input_expr], block.node)),
            block.node))
    before = builder.part(setup, "before", "before the forward", cell_region, None, filename)
    invokes = []
    for block, rule in zip(blocks, rules):
        region = graph.add_region("invoke", line=block.line, label=_label(block),
                                  parent=cell_region)
        graph.invokes.append(region)
        _reject_return_and_yield(block.body)
        body = builder.invoke_code(block.body, region, block.index, filename, block.node)
        invokes.append(InvokeCode(block.index, block.line, body, rule.params,
                                  frozenset(rule.own), frozenset(rule.arrive)))
    after_code = builder.part(after, "after", "after the forward", cell_region, None, filename)
    builder.finish()
    return CompiledCell(graph, before, invokes, after_code, filename, builder.parts, model_expr,
                        roots, tuple(sorted(varying)))


def _label(block: Block) -> str:
    if not block.loops:
        return f"invoke {block.index}"
    loop = block.loops[-1]
    head = (f"for {ast.unparse(loop.target)} in {ast.unparse(loop.iter)}"
            if isinstance(loop, ast.For) else f"while {ast.unparse(loop.test)}")
    return f"invoke {block.index} (each `{head}`)"


def _replace(body: list[ast.stmt], old: ast.stmt, new: ast.stmt) -> bool:
    """Put ``new`` where ``old`` is, anywhere in the statements of ``body``."""
    for i, stmt in enumerate(body):
        if stmt is old:
            body[i] = new
            return True
        if any(_replace(block, old, new) for _, _, block in child_blocks(stmt)):
            return True
    return False


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


def _reject_return_and_yield(body: list[ast.stmt]) -> None:
    """An invoke's body runs during the forward, on its own: no ``return``/``yield``, and no
    ``break``/``continue`` of a loop around the invoke (the loop has finished by then)."""
    todo: list[tuple[ast.AST, bool]] = [(stmt, False) for stmt in body]
    while todo:
        node, in_loop = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, (ast.Return, ast.Yield, ast.YieldFrom, ast.Await)):
            raise CellSyntaxError(f"`{ast.unparse(node).split()[0]}` outside a function",
                                  line=node.lineno)
        if isinstance(node, (ast.Break, ast.Continue)) and not in_loop:
            word = "break" if isinstance(node, ast.Break) else "continue"
            raise CellSyntaxError(
                f"`{word}` in an invoke block: its body runs during the forward, after the loop "
                "around it has registered every invoke, so it cannot end that loop. Decide "
                "before the `with` (`if ...: continue`), or skip the work inside the block",
                line=node.lineno)
        loop = isinstance(node, (ast.For, ast.While, ast.AsyncFor))
        todo.extend((child, in_loop or (loop and child in node.body))
                    for child in ast.iter_child_nodes(node))
