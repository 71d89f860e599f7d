"""The cell as written, in time: the set-up statements run before the forward, in order;
the invoke blocks run during it. This module says which binding of a name a line sees, as
if the cell ran top to bottom, so that the run gives what the text says or stops.

>>> import ast
>>> from ipy_intervene.compiler.invokes import find_blocks
>>> tree = ast.parse("s = 0\\nwith tracer.invoke(a):\\n    s = 1\\ns = 2\\n"
...                  "with tracer.invoke(b):\\n    t = s\\n")
>>> setup, blocks, _ = find_blocks(tree, has_input=False)
>>> line = Timeline(setup, blocks)
>>> [b.line for b in line.latest("s", blocks[1].line, ())]       # the set-up's `s = 2`
[4]
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Iterator

from ipy_intervene.compiler.syntax import all_defs, child_blocks, header_parts, statement_names
from ipy_intervene.errors import CellSyntaxError


@dataclass
class Block:
    """One ``with tracer.invoke(X):`` block of the cell."""

    index: int
    node: ast.With
    input_expr: ast.expr
    loops: list[ast.stmt] = field(default_factory=list)  # enclosing for/while, outermost first

    @property
    def line(self) -> int:
        return self.node.lineno

    @property
    def body(self) -> list[ast.stmt]:
        return self.node.body

    @property
    def multi(self) -> bool:
        """Whether the block can run more than once (one invoke per item of its loop)."""
        return bool(self.loops)

    def describe(self) -> str:
        if not self.loops:
            return f"the invoke at line {self.line}"
        return f"every invoke of the loop at line {self.loops[0].lineno} (one per item)"


@dataclass(frozen=True)
class Binding:
    """A place a name is bound: a set-up statement (``block`` None) or an invoke block."""

    line: int
    loops: tuple[int, ...]     # ids of the loops around it
    block: Block | None = None  # the invoke block that binds it


class Timeline:
    """Where each name is bound, and where the set-up reads names and mutates values."""

    def __init__(self, setup: list[ast.stmt], blocks: list) -> None:
        self.blocks = {id(b.node): b for b in blocks}
        self.bindings: dict[str, list[Binding]] = {}
        self.reads: list[tuple[ast.Name, tuple[int, ...]]] = []        # set-up reads
        self.functions: list[tuple[str, ast.AST, tuple[int, ...]]] = []  # set-up defs, lambdas
        for stmt in setup:
            self._walk(stmt, ())
        for block in blocks:
            for name in all_defs(block.body):
                self.bindings.setdefault(name, []).append(
                    Binding(block.line, tuple(id(x) for x in block.loops), block))

    def _walk(self, stmt: ast.stmt, loops: tuple[int, ...]) -> None:
        block = self.blocks.get(id(stmt))
        if block is not None:  # its INPUT is read now; its body runs during the forward
            self._note_reads(block.input_expr, loops)
            return
        inner = loops + (id(stmt),) if isinstance(stmt, (ast.For, ast.While)) else loops
        defs = statement_names(stmt)[0]
        for name in defs:
            where = inner if isinstance(stmt, ast.For) else loops
            self.bindings.setdefault(name, []).append(Binding(stmt.lineno, where))
        for part in header_parts(stmt):
            self._note_reads(part, inner)
        self._note_functions(stmt, loops)
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return  # its body runs when it is called
        for field, _, block in child_blocks(stmt):
            for child in block:
                self._walk(child, inner if field != "orelse" else loops)

    def _note_reads(self, node: ast.AST, loops: tuple[int, ...]) -> None:
        local = {n.id for c in ast.walk(node) if isinstance(c, ast.comprehension)
                 for n in ast.walk(c.target) if isinstance(n, ast.Name)}
        local |= {a.arg for f in ast.walk(node) if isinstance(f, ast.Lambda)
                  for a in ast.walk(f.args) if isinstance(a, ast.arg)}
        for sub in _walk_no_functions(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id not in local:
                self.reads.append((sub, loops))

    def _note_functions(self, stmt: ast.stmt, loops: tuple[int, ...]) -> None:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self.functions.append((stmt.name, stmt, loops))
        elif isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Lambda):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    self.functions.append((target.id, stmt.value, loops))

    # -- which binding a line sees ---------------------------------------------------------

    def latest(self, name: str, line: int, loops: tuple[int, ...]) -> list[Binding]:
        """The bindings of ``name`` that may be the last one run before ``line``: the
        nearest above it, and any below it inside a loop around both (an earlier item's)."""
        found = self.bindings.get(name, [])
        above = [b for b in found if b.line < line]
        nearest = [max(above, key=lambda b: b.line)] if above else []
        again = [b for b in found if b.line >= line and set(b.loops) & set(loops)]
        return list({id(b): b for b in nearest + again}.values())

    def later(self, name: str, line: int) -> list[Binding]:
        return [b for b in self.bindings.get(name, []) if b.line >= line]

    def varying(self) -> set[str]:
        """Set-up names whose value can differ between invokes: bound in a loop around
        invokes or after the first invoke, or set by a function of the cell (``global``)."""
        first = min(b.line for b in self.blocks.values())
        around = {x for b in self.blocks.values() for x in map(id, b.loops)}
        return {name for name, found in self.bindings.items()
                if any(b.block is None and (b.line > first or set(b.loops) & around)
                       for b in found)} | self.set_by_functions

    @property
    def set_by_functions(self) -> set[str]:
        return {n for _, f, _ in self.functions if isinstance(f, ast.FunctionDef)
                for g in ast.walk(f) if isinstance(g, ast.Global) for n in g.names}


def free_names(function: ast.AST) -> set[str]:
    """Names a function (or lambda) reads from outside itself."""
    args = {a.arg for a in ast.walk(function.args) if isinstance(a, ast.arg)}
    body = function.body if isinstance(function.body, list) else [ast.Expr(function.body)]
    inner = all_defs(body) | args
    return {n.id for s in body for n in ast.walk(s)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - inner


#: method names that change the object they are called on (lists, dicts, sets, tensors' ``x_``)
MUTATORS = frozenset({"append", "extend", "insert", "update", "add", "setdefault", "pop",
                      "remove", "clear", "__setitem__"})


def mutated(node: ast.AST) -> set[str]:
    """Names whose value ``node`` changes in place (``x[...] = v``, ``x.attr = v``,
    ``x.append(v)``, ``x.add_(v)``)."""
    names = set()
    for sub in _walk_no_functions(node):
        target = None
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute):
            attr = sub.func.attr
            if attr in MUTATORS or (attr.endswith("_") and not attr.startswith("_")):
                target = sub.func.value
        elif isinstance(sub, (ast.Subscript, ast.Attribute)) and isinstance(sub.ctx, ast.Store):
            target = sub.value
        while isinstance(target, (ast.Subscript, ast.Attribute)):
            target = target.value
        if isinstance(target, ast.Name):
            names.add(target.id)
    return names


def _walk_no_functions(node: ast.AST) -> Iterator[ast.AST]:
    todo = [node]
    while todo:
        sub = todo.pop()
        yield sub
        if not isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(sub))


def check_setup(timeline: Timeline, blocks: list, uses: list[set[str]],
                defs: list[set[str]]) -> None:
    """The set-up runs before the forward: it cannot read what an invoke binds, or hand the
    invokes a function that reads a name an invoke binds (each invoke's own)."""
    for node, loops in timeline.reads:
        seen = timeline.latest(node.id, node.lineno, loops)
        block = next((b.block for b in seen if b.block is not None), None)
        if block is not None:
            raise CellSyntaxError(
                f"`{node.id}` is read here, before the forward runs (statements between "
                f"invoke blocks run when the invokes are set up), but the invoke at line "
                f"{block.line} binds it during the forward: move this line after the last "
                "invoke block", line=node.lineno)
    bound_by_invokes = set().union(*defs)
    called = set().union(*uses)
    for name, function, loops in timeline.functions:
        reads = sorted(free_names(function) & bound_by_invokes)
        if name in called and reads:
            raise CellSyntaxError(
                f"`{name}`, called by the invokes during the forward, reads "
                f"{', '.join(f'`{r}`' for r in reads)} from the notebook, but an invoke binds "
                f"it as its own name, which a function defined outside the invoke does not "
                f"see. Pass it as an argument (`{name}(..., {reads[0]})`)",
                line=function.lineno)
