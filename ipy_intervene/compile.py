"""Cell AST -> :class:`InterventionGraph` + code objects for each invoke.

The compiler owns the cell text. It splits the cell into the code before the first invoke,
one body per invoke and the code after the last one, and rewrites every module site it can
see (``model.transformer.h[2].output``, ``m.output = v``, ``m.output[:, -1] = 0``,
``m.skip(v)``, ``model.lm_head(x)``, ``tracer.output``) into a call on the runtime bridge
``__ii__`` that carries the site's node id. Control flow is instrumented
(``__ii__.branch``/``__ii__.loop``) so the graph can say what ran. Names that flow between
invokes get ``__ii__.wait_for``/``__ii__.bound`` barriers.

>>> cell = compile_cell("h = model.transformer.h[0].output", has_input=True)
>>> [s.label for s in cell.graph.sites], cell.graph.published
(['transformer.h[0].output'], ['h'])
"""

from __future__ import annotations

import ast
import copy
import functools
from dataclasses import dataclass
from types import CodeType
from typing import Callable

from ipy_intervene.errors import CellSyntaxError
from ipy_intervene.graph import InterventionGraph, Site, Statement

BRIDGE = "__ii__"
TRACER = "tracer"
SITE_ATTRS = ("output", "input", "inputs")
INTERNAL_NAMES = frozenset({BRIDGE, TRACER, "__builtins__"})
_AUG_OPS = {ast.Add: "iadd", ast.Sub: "isub", ast.Mult: "imul", ast.Div: "itruediv",
            ast.MatMult: "imatmul", ast.Pow: "ipow", ast.FloorDiv: "ifloordiv", ast.Mod: "imod"}

Part = tuple[str, object]  # ("attr", "h") | ("index", 2) | ("key", "q") | ("sym", "l")


@dataclass
class InvokeCode:
    """One ``with tracer.invoke(X):`` block (or the whole cell when INPUT is on the line)."""

    index: int
    line: int
    input_code: CodeType | None
    body: CodeType


@dataclass
class CompiledCell:
    graph: InterventionGraph
    before: CodeType | None
    invokes: list[InvokeCode]
    after: CodeType | None
    filename: str
    site_parts: dict[int, tuple[Part, ...]]

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
    model_node = _parse_model_expr(model_expr)
    before, invokes, after = split_invokes(tree, has_input)
    graph = InterventionGraph(source=source)
    builder = _GraphBuilder(graph, source, model_node, [body for _, _, body in invokes])
    cell_region = graph.add_region("cell", line=1, label="cell")
    before_code = builder.part(before, "before", "before the forward", cell_region, None, filename)
    invoke_codes = []
    for index, (line, input_expr, body) in enumerate(invokes):
        region = graph.add_region("invoke", line=line, label=f"invoke {index}", parent=cell_region)
        graph.invokes.append(region)
        body_code = builder.block_code(body, region, index, filename)
        input_code = None
        if input_expr is not None:
            input_code = compile(ast.Expression(body=input_expr), filename, "eval")
        invoke_codes.append(InvokeCode(index, line, input_code, body_code))
    after_code = builder.part(after, "after", "after the forward", cell_region, None, filename)
    builder.finish()
    return CompiledCell(graph, before_code, invoke_codes, after_code, filename, builder.parts)


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


def split_invokes(tree: ast.Module, has_input: bool):
    """(before, [(line, input_expr, body)], after) of a cell."""
    top = [(i, _invoke_input(s)) for i, s in enumerate(tree.body)]
    positions = [i for i, x in top if x is not None]
    _reject_nested_invokes(tree, set(positions))
    if has_input:
        if positions:
            raise CellSyntaxError("INPUT is given on the magic line and the cell also has "
                                  "`tracer.invoke` blocks: use one or the other",
                                  line=tree.body[positions[0]].lineno)
        return [], [(1, None, tree.body)], []
    if not positions:
        raise CellSyntaxError("no INPUT on the magic line and no `with tracer.invoke(INPUT):` "
                              "block in the cell: write `%%trace model \"a prompt\"` or add "
                              "invoke blocks")
    first, last = positions[0], positions[-1]
    for stmt in tree.body[first:last + 1]:
        if _invoke_input(stmt) is None and not _is_noop(stmt):
            raise CellSyntaxError("statements between invoke blocks are not supported: move "
                                  "them before the first invoke or after the last one",
                                  line=stmt.lineno)
    invokes = [(tree.body[i].lineno, x, tree.body[i].body) for i, x in top if x is not None]
    return tree.body[:first], invokes, tree.body[last + 1:]


def _reject_nested_invokes(tree: ast.Module, top_level: set[int]) -> None:
    top_nodes = {id(tree.body[i]) for i in top_level}
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and id(node) not in top_nodes and _invoke_input(node):
            raise CellSyntaxError("`with tracer.invoke(...)` must be at the top level of the "
                                  "cell, not inside another block", line=node.lineno)


# -- names ----------------------------------------------------------------------------------

def _names(node: ast.AST) -> tuple[set[str], set[str]]:
    """(stored, loaded) names under ``node``, leaving comprehension variables out."""
    local: set[str] = set()
    stored: set[str] = set()
    loaded: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            (loaded if isinstance(sub.ctx, ast.Load) else stored).add(sub.id)
        elif isinstance(sub, ast.comprehension):
            local |= {n.id for n in ast.walk(sub.target) if isinstance(n, ast.Name)}
        elif isinstance(sub, ast.Lambda):
            local |= {a.arg for a in sub.args.args}
    return stored - local, loaded - local


def _header(stmt: ast.stmt) -> list[ast.AST]:
    """The parts of a statement that run when the statement itself runs (not its body)."""
    if isinstance(stmt, (ast.If, ast.While)):
        return [stmt.test]
    if isinstance(stmt, (ast.For, ast.AsyncFor)):
        return [stmt.target, stmt.iter]
    if isinstance(stmt, (ast.With, ast.AsyncWith)):
        return list(stmt.items)
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return list(stmt.decorator_list)
    if isinstance(stmt, ast.Try):
        return []
    return [stmt]


def statement_names(stmt: ast.stmt) -> tuple[set[str], set[str]]:
    """(defs, uses) of a statement's own header (a compound statement's body is separate)."""
    defs: set[str] = set()
    uses: set[str] = set()
    for part in _header(stmt):
        stored, loaded = _names(part)
        defs |= stored
        uses |= loaded
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        defs.add(stmt.name)
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        defs |= {(a.asname or a.name).split(".")[0] for a in stmt.names}
    return defs, uses


def _all_defs(body: list[ast.stmt]) -> set[str]:
    out: set[str] = set()
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.stmt):
                out |= statement_names(node)[0]
    return out


def _all_uses(body: list[ast.stmt]) -> set[str]:
    out: set[str] = set()
    for stmt in body:
        out |= _names(stmt)[1]
    return out


# -- the rewriting walk ---------------------------------------------------------------------

def _locate(node: ast.AST, like: ast.AST) -> ast.AST:
    """Give ``node`` and its descendants that have no location the location of ``like``.

    Cheaper than ``ast.fix_missing_locations`` over the whole cell: only new nodes are
    visited, because the walk stops at nodes that already have a location.
    """
    where = {"lineno": like.lineno, "col_offset": like.col_offset,
             "end_lineno": getattr(like, "end_lineno", like.lineno),
             "end_col_offset": getattr(like, "end_col_offset", like.col_offset)}
    todo = [node]
    while todo:
        current = todo.pop()
        for attr, value in where.items():
            if attr in current._attributes and getattr(current, attr, None) is None:
                setattr(current, attr, value)
        todo.extend(child for child in ast.iter_child_nodes(current)
                    if "lineno" in child._attributes and not hasattr(child, "lineno"))
    return node


def _bridge_call(method: str, args: list[ast.expr], node: ast.AST) -> ast.Call:
    call = ast.Call(func=ast.Attribute(value=ast.Name(BRIDGE, ast.Load()), attr=method,
                                       ctx=ast.Load()), args=args, keywords=[])
    return _locate(call, node)


def _index_expr(slice_node: ast.expr) -> ast.expr:
    """``__ii__.index[<slice>]``: turns slice syntax into a value."""
    bridge_index = ast.Attribute(value=ast.Name(BRIDGE, ast.Load()), attr="index", ctx=ast.Load())
    return _locate(ast.Subscript(value=bridge_index, slice=slice_node, ctx=ast.Load()), slice_node)


class _GraphBuilder:
    """Walks statements, records the graph and rewrites sites and control flow."""

    def __init__(self, graph: InterventionGraph, source: str, model_node: ast.expr,
                 invoke_bodies: list[list[ast.stmt]]) -> None:
        self.graph = graph
        self.lines = source.splitlines()
        self.model_node = model_node
        self.model_dump = ast.dump(model_node)
        self.model_name = model_node.id if isinstance(model_node, ast.Name) else None
        self.parts: dict[int, tuple[Part, ...]] = {}
        self.invoke: int | None = None
        self.statement = -1
        self.region = 0
        self.cross_uses: list[set[str]] = [set() for _ in invoke_bodies]
        self.cross_defs: list[set[str]] = [set() for _ in invoke_bodies]
        if len(invoke_bodies) > 1:
            self._cross_invoke_names(invoke_bodies)
        self.defined_here: set[str] = set()

    def _cross_invoke_names(self, invoke_bodies: list[list[ast.stmt]]) -> None:
        """Names one invoke uses and another binds: they get wait_for/bound barriers."""
        defs = [_all_defs(b) for b in invoke_bodies]
        uses = [_all_uses(b) for b in invoke_bodies]
        self.cross_uses = [uses[j] & set().union(*(defs[i] for i in range(len(defs)) if i != j))
                           for j in range(len(defs))]
        self.cross_defs = [defs[i] & set().union(*(uses[j] for j in range(len(uses)) if j != i))
                           for i in range(len(defs))]

    # parts of the cell

    def part(self, body, kind, label, parent, invoke, filename) -> CodeType | None:
        if not body:
            return None
        region = self.graph.add_region(kind, line=body[0].lineno, label=label, parent=parent)
        return self.block_code(body, region, invoke, filename)

    def block_code(self, body, region, invoke, filename) -> CodeType:
        self.invoke, self.defined_here = invoke, set()
        module = ast.Module(body=self.block(body, region), type_ignores=[])
        try:
            return compile(module, filename, "exec")
        except TypeError:  # a node without a location slipped through: fill them all
            return compile(ast.fix_missing_locations(module), filename, "exec")

    def finish(self) -> None:
        last_def: dict[str, int] = {}
        for stmt in self.graph.statements:
            for name in sorted(stmt.uses):
                if name in last_def and last_def[name] != stmt.id:
                    self.graph.edges.append((last_def[name], stmt.id, name))
            for name in stmt.defs:
                last_def[name] = stmt.id
        top = {r.id for r in self.graph.regions if r.kind != "def"}
        published = []
        for stmt in self.graph.statements:
            if self._outside_functions(stmt.region, top):
                published += [d for d in stmt.defs if d not in INTERNAL_NAMES and d not in published]
        self.graph.published = published

    def _outside_functions(self, region_id: int, top: set[int]) -> bool:
        region = self.graph.regions[region_id]
        while region.kind != "cell":
            if region.id not in top:
                return False
            region = self.graph.regions[region.parent]
        return True

    # statements

    def block(self, stmts: list[ast.stmt], region: int) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for stmt in stmts:
            out.extend(self.stmt(stmt, region))
        return out or [ast.Pass(lineno=1, col_offset=0, end_lineno=1, end_col_offset=0)]

    def stmt(self, stmt: ast.stmt, region: int) -> list[ast.stmt]:
        defs, uses = statement_names(stmt)
        sid = len(self.graph.statements)
        self.graph.statements.append(Statement(sid, stmt.lineno, self._text(stmt), region,
                                               tuple(sorted(defs)), tuple(sorted(uses))))
        self.statement, self.region = sid, region
        before = self._wait_for(uses, stmt)
        self.defined_here |= defs
        rewritten = self._rewrite_stmt(stmt, region)
        return before + [rewritten] + self._bound(defs, stmt)

    def _text(self, stmt: ast.stmt) -> str:
        line = self.lines[stmt.lineno - 1].strip() if stmt.lineno <= len(self.lines) else ""
        return line if len(line) <= 60 else line[:57] + "..."

    def _wait_for(self, uses: set[str], stmt: ast.stmt) -> list[ast.stmt]:
        if self.invoke is None:
            return []
        waiting = sorted((uses & self.cross_uses[self.invoke]) - self.defined_here)
        if not waiting:
            return []
        names = ast.Tuple([ast.Constant(n) for n in waiting], ast.Load())
        return [_locate(ast.Expr(_bridge_call(
            "wait_for", [names, ast.Constant(stmt.lineno)], stmt)), stmt)]

    def _bound(self, defs: set[str], stmt: ast.stmt) -> list[ast.stmt]:
        if self.invoke is None or isinstance(stmt, ast.Return):
            return []
        names = sorted(defs & self.cross_defs[self.invoke])
        if not names:
            return []
        return [_locate(ast.Expr(_bridge_call(
            "bound", [ast.Tuple([ast.Constant(n) for n in names], ast.Load())], stmt)), stmt)]

    def _rewrite_stmt(self, stmt: ast.stmt, region: int) -> ast.stmt:
        if isinstance(stmt, ast.If):
            return self._rewrite_if(stmt, region)
        if isinstance(stmt, (ast.For, ast.AsyncFor)):
            return self._rewrite_for(stmt, region)
        if isinstance(stmt, ast.While):
            return self._rewrite_while(stmt, region)
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return self._rewrite_def(stmt, region)
        if isinstance(stmt, ast.Assign):
            return self._rewrite_assign(stmt)
        if isinstance(stmt, ast.AugAssign):
            return self._rewrite_augassign(stmt)
        if isinstance(stmt, ast.Delete) and any(self._site_of(t) for t in stmt.targets):
            raise CellSyntaxError("a module site cannot be deleted", line=stmt.lineno)
        return self._rewrite_generic(stmt, region)

    def _rewrite_generic(self, stmt: ast.stmt, region: int) -> ast.stmt:
        for field, value in ast.iter_fields(stmt):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                setattr(stmt, field, self.block(value, region))
            elif isinstance(value, list) and value and isinstance(value[0], ast.excepthandler):
                for handler in value:
                    handler.body = self.block(handler.body, region)
                    if handler.type is not None:
                        handler.type = self.expr(handler.type)
            elif isinstance(value, list):
                setattr(stmt, field, [self.expr(v) if isinstance(v, ast.AST) else v for v in value])
            elif isinstance(value, ast.AST):
                setattr(stmt, field, self.expr(value))
        return stmt

    def _sub_region(self, kind: str, stmt: ast.stmt, label: str, region: int) -> int:
        return self.graph.add_region(kind, line=stmt.lineno, label=label, parent=region)

    def _body_and_else(self, stmt, body_region: int, region: int) -> ast.stmt:
        """Rewrite an if/for/while body in its own region; ``else`` stays in the outer one."""
        stmt.body = self.block(stmt.body, body_region)
        if stmt.orelse:
            stmt.orelse = self.block(stmt.orelse, region)
        return stmt

    def _rewrite_if(self, stmt: ast.If, region: int) -> ast.stmt:
        rid = self._sub_region("if", stmt, f"if {ast.unparse(stmt.test)}", region)
        stmt.test = _bridge_call("branch", [ast.Constant(rid), self.expr(stmt.test)], stmt.test)
        return self._body_and_else(stmt, rid, region)

    def _rewrite_for(self, stmt: ast.For, region: int) -> ast.stmt:
        steps = (isinstance(stmt.iter, ast.Call) and isinstance(stmt.iter.func, ast.Attribute)
                 and stmt.iter.func.attr == "steps" and isinstance(stmt.iter.func.value, ast.Name)
                 and stmt.iter.func.value.id == TRACER)
        label = f"for {ast.unparse(stmt.target)} in {ast.unparse(stmt.iter)}"
        rid = self._sub_region("steps" if steps else "for", stmt, label, region)
        stmt.target = self.expr(stmt.target)
        stmt.iter = _bridge_call("loop", [ast.Constant(rid), self.expr(stmt.iter)], stmt.iter)
        return self._body_and_else(stmt, rid, region)

    def _rewrite_while(self, stmt: ast.While, region: int) -> ast.stmt:
        rid = self._sub_region("while", stmt, f"while {ast.unparse(stmt.test)}", region)
        stmt.test = _bridge_call("branch", [ast.Constant(rid), self.expr(stmt.test)], stmt.test)
        return self._body_and_else(stmt, rid, region)

    def _rewrite_def(self, stmt, region: int) -> ast.stmt:
        rid = self._sub_region("def", stmt, f"def {stmt.name}", region)
        stmt.decorator_list = [self.expr(d) for d in stmt.decorator_list]
        stmt.args.defaults = [self.expr(d) for d in stmt.args.defaults]
        stmt.body = self.block(stmt.body, rid)
        return stmt

    def _rewrite_assign(self, stmt: ast.Assign) -> ast.stmt:
        site_targets = [t for t in stmt.targets if self._site_of(t) or self._site_subscript(t)]
        if not site_targets:
            return self._rewrite_generic(stmt, self.region)
        if len(stmt.targets) != 1:
            raise CellSyntaxError("assign one module site at a time "
                                  "(`m.output = value`, not `a = m.output = value`)",
                                  line=stmt.lineno)
        target, value = stmt.targets[0], self.expr(stmt.value)
        site = self._site_of(target)
        if site is not None:
            chain, attr = site
            sid = self._add_site(chain, attr, "write", target)
            call = _bridge_call("write", [self._chain_expr(chain), ast.Constant(attr), value,
                                          ast.Constant(sid)], stmt)
            return _locate(ast.Expr(call), stmt)
        chain, attr = self._site_of(target.value)
        sid = self._add_site(chain, attr, "edit", target)
        call = _bridge_call("setitem", [self._chain_expr(chain), ast.Constant(attr),
                                        _index_expr(self.expr(target.slice)), value,
                                        ast.Constant(sid)], stmt)
        return _locate(ast.Expr(call), stmt)

    def _rewrite_augassign(self, stmt: ast.AugAssign) -> ast.stmt:
        site = self._site_of(stmt.target)
        if site is None:
            if self._site_subscript(stmt.target):
                chain, attr = self._site_of(stmt.target.value)
                sid = self._add_site(chain, attr, "edit", stmt.target)
                stmt.target.value = self._read_call(chain, attr, sid, stmt.target.value)
                stmt.target.slice = self.expr(stmt.target.slice)
                stmt.value = self.expr(stmt.value)
                return stmt
            return self._rewrite_generic(stmt, self.region)
        op = _AUG_OPS.get(type(stmt.op))
        if op is None:
            raise CellSyntaxError(f"`{ast.unparse(stmt)}`: this operator cannot update a "
                                  "module site in place", line=stmt.lineno)
        chain, attr = site
        sid = self._add_site(chain, attr, "edit", stmt.target)
        call = _bridge_call("augment", [self._chain_expr(chain), ast.Constant(attr),
                                        ast.Constant(op), self.expr(stmt.value),
                                        ast.Constant(sid)], stmt)
        return _locate(ast.Expr(call), stmt)

    # expressions

    def expr(self, node: ast.AST) -> ast.AST:
        return _ExprRewriter(self).visit(node)

    def chain(self, node: ast.AST) -> list[Part] | None:
        """The module path of an expression rooted at the model, else None."""
        if isinstance(node, ast.Name) and self.model_name is not None:
            return [] if node.id == self.model_name else None
        if type(node) is type(self.model_node) and ast.dump(node) == self.model_dump:
            return []
        if isinstance(node, ast.Attribute) and node.attr not in SITE_ATTRS:
            base = self.chain(node.value)
            return None if base is None else base + [("attr", node.attr)]
        if isinstance(node, ast.Subscript):
            base = self.chain(node.value)
            if base is None:
                return None
            index = node.slice
            if isinstance(index, ast.Constant) and isinstance(index.value, int):
                return base + [("index", index.value)]
            if (isinstance(index, ast.UnaryOp) and isinstance(index.op, ast.USub)
                    and isinstance(index.operand, ast.Constant)
                    and isinstance(index.operand.value, int)):
                return base + [("index", -index.operand.value)]
            if isinstance(index, ast.Constant) and isinstance(index.value, str):
                return base + [("key", index.value)]
            return base + [("sym", ast.unparse(index))]
        return None

    def _site_of(self, node: ast.AST) -> tuple[ast.AST, str] | None:
        """(chain node, attr) when ``node`` is ``<model chain>.output|input|inputs``."""
        if (isinstance(node, ast.Attribute) and node.attr in SITE_ATTRS
                and self.chain(node.value) is not None):
            return node.value, node.attr
        return None

    def _site_subscript(self, node: ast.AST) -> bool:
        return isinstance(node, ast.Subscript) and self._site_of(node.value) is not None

    def _chain_expr(self, chain: ast.AST) -> ast.AST:
        """The chain itself, with any expressions inside its indices rewritten."""
        return self.expr(chain)

    def _add_site(self, chain: ast.AST | None, attr: str, access: str, node: ast.AST) -> int:
        parts = tuple(self.chain(chain)) if chain is not None else ()
        sid = len(self.graph.sites)
        self.graph.sites.append(Site(
            sid, node.lineno, format_path(parts), attr, access, self.invoke, self.region,
            self.statement, symbolic=any(k == "sym" for k, _ in parts)))
        self.parts[sid] = parts
        return sid

    def _read_call(self, chain: ast.AST, attr: str, sid: int, node: ast.AST) -> ast.Call:
        return _bridge_call("read", [self._chain_expr(chain), ast.Constant(attr),
                                     ast.Constant(sid)], node)


class _ExprRewriter(ast.NodeTransformer):
    def __init__(self, builder: _GraphBuilder) -> None:
        self.b = builder

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if isinstance(node.ctx, ast.Load):
            site = self.b._site_of(node)
            if site is not None:
                chain, attr = site
                return self.b._read_call(chain, attr, self.b._add_site(chain, attr, "read", node),
                                         node)
            if (node.attr == "output" and isinstance(node.value, ast.Name)
                    and node.value.id == TRACER):
                sid = self.b._add_site(None, "model_output", "read", node)
                return _bridge_call("model_output", [ast.Constant(sid)], node)
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "skip" and self.b.chain(func.value) is not None:
            if len(node.args) != 1 or node.keywords:
                raise CellSyntaxError("write a skip as `module.skip(value)`: one value, the "
                                      "output the module would have produced", line=node.lineno)
            sid = self.b._add_site(func.value, "skip", "skip", node)
            return _bridge_call("skip", [self.b._chain_expr(func.value), self.visit(node.args[0]),
                                         ast.Constant(sid)], node)
        chain = self.b.chain(func)
        if chain:
            sid = self.b._add_site(func, "call", "call", node)
            call = _bridge_call("call", [self.b._chain_expr(func), ast.Constant(sid)], node)
            call.args += [self.visit(a) for a in node.args]
            call.keywords = [self.visit(k) for k in node.keywords]
            return call
        return self.generic_visit(node)


def format_path(parts: tuple[Part, ...] | list[Part]) -> str:
    """``(("attr","transformer"),("attr","h"),("index",2))`` -> ``"transformer.h[2]"``."""
    out = ""
    for kind, value in parts:
        if kind == "attr":
            out += f".{value}" if out else str(value)
        elif kind == "key":
            out += f"[{value!r}]"
        else:
            out += f"[{value}]"
    return out
