"""The rewriting walk: records a cell's :class:`InterventionGraph` while turning its AST
into runnable code.

:class:`_GraphBuilder` walks statements, adds a graph statement per statement, a region per
block (``if``/``for``/``while``/``def``) and a :class:`Site` per module site it can see, and
rewrites each site into a call on the runtime bridge ``__ii__``; ``rewrite_expr.py`` does
the same for the sites inside one expression. ``compile.py`` drives the walk.

>>> import ast
>>> graph = InterventionGraph(source="y = model.h[0].output")
>>> builder = _GraphBuilder(graph, graph.source, ast.parse("model", mode="eval").body)
>>> code = builder.block_code(ast.parse(graph.source).body, graph.add_region("cell", line=1,
...                           label="cell"), None, "<cell>")
>>> [(s.label, s.access) for s in graph.sites]
[('h[0].output', 'read')]
"""

from __future__ import annotations

import ast
from types import CodeType

from ipy_intervene.compiler.graph import InterventionGraph, Site, Statement
from ipy_intervene.compiler.invokes import InvokeNames
from ipy_intervene.compiler.rewrite_expr import ExprRewriter
from ipy_intervene.compiler.syntax import (
    BRIDGE,
    INTERNAL_NAMES,
    SITE_ATTRS,
    TRACER,
    Part,
    bridge_call,
    child_blocks,
    compile_module,
    format_path,
    index_expr,
    locate,
    statement_names,
)
from ipy_intervene.errors import CellSyntaxError

_AUG_OPS = {ast.Add: "iadd", ast.Sub: "isub", ast.Mult: "imul", ast.Div: "itruediv",
            ast.MatMult: "imatmul", ast.Pow: "ipow", ast.FloorDiv: "ifloordiv", ast.Mod: "imod"}


class _GraphBuilder:
    """Walks statements, records the graph and rewrites sites and control flow."""

    def __init__(self, graph: InterventionGraph, source: str, model_node: ast.expr,
                 rules: list[InvokeNames] | None = None) -> None:
        self.graph = graph
        self.lines = source.splitlines()
        self.model_node = model_node
        self.model_dump = ast.dump(model_node)
        self.model_name = model_node.id if isinstance(model_node, ast.Name) else None
        self.parts: dict[int, tuple[Part, ...]] = {}
        self.invoke: int | None = None
        self.statement = -1
        self.region = 0
        self.rules = rules or []  # per invoke block: how its names are bound (invokes.py)

    def rule(self) -> InvokeNames | None:
        return self.rules[self.invoke] if self.invoke is not None and self.rules else None

    # parts of the cell

    def part(self, body, kind, label, parent, invoke, filename) -> CodeType | None:
        if not body:
            return None
        region = self.graph.add_region(kind, line=body[0].lineno, label=label, parent=parent)
        return self.block_code(body, region, invoke, filename)

    def block_code(self, body, region, invoke, filename) -> CodeType:
        self.invoke = invoke
        return compile_module(self.block(body, region), filename)

    def invoke_code(self, body, region, invoke, filename, where: ast.stmt) -> CodeType:
        """An invoke block's body as a function of the names captured when the invoke is
        registered (a missing one is unbound: ``__ii__.UNSET``, deleted on entry). Names it
        binds are its own locals, returned at its end for the run to publish; the ones other
        invokes read are the notebook's globals, live while the forward runs."""
        self.invoke = invoke
        rule = self.rules[invoke]
        stmts = self.block(body, region)
        stmts.append(locate(ast.Return(ast.Call(ast.Name("locals", ast.Load()), [], [])),
                            stmts[-1]))
        unset = ast.Attribute(ast.Name(BRIDGE, ast.Load()), "UNSET", ast.Load())
        prologue: list[ast.stmt] = [ast.If(
            ast.Compare(ast.Name(p, ast.Load()), [ast.Is()], [unset]),
            [ast.Delete([ast.Name(p, ast.Del())])], []) for p in rule.params]
        if rule.flow_out:
            prologue.insert(0, ast.Global(names=sorted(rule.flow_out)))
        args = ast.arguments(posonlyargs=[], args=[], kwonlyargs=[ast.arg(arg=p) for p in rule.params],
                             kw_defaults=[None] * len(rule.params), defaults=[])
        fn = ast.FunctionDef(name="invoke", args=args, body=[locate(p, where) for p in prologue]
                             + stmts, decorator_list=[], returns=None)
        code = compile_module([locate(fn, where)], filename)
        return next(c for c in code.co_consts if isinstance(c, CodeType))

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
        rewritten = self._rewrite_stmt(stmt, region)
        rewritten = rewritten if isinstance(rewritten, list) else [rewritten]
        return before + rewritten + self._bound(defs, stmt)

    def _text(self, stmt: ast.stmt) -> str:
        line = self.lines[stmt.lineno - 1].strip() if stmt.lineno <= len(self.lines) else ""
        return line if len(line) <= 60 else line[:57] + "..."

    def _wait_for(self, uses: set[str], stmt: ast.stmt) -> list[ast.stmt]:
        rule = self.rule()
        waiting = sorted(uses & rule.flow_in) if rule is not None else []
        if not waiting:
            return []
        names = ast.Tuple([ast.Constant(n) for n in waiting], ast.Load())
        return [locate(ast.Expr(bridge_call(
            "wait_for", [names, ast.Constant(stmt.lineno)], stmt)), stmt)]

    def _bound(self, defs: set[str], stmt: ast.stmt) -> list[ast.stmt]:
        rule = self.rule()
        names = sorted(defs & rule.flow_out) if rule is not None else []
        if not names or isinstance(stmt, ast.Return):
            return []
        return [locate(ast.Expr(bridge_call(
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
        if isinstance(stmt, ast.Delete) and any(self.site_of(t) for t in stmt.targets):
            raise CellSyntaxError("a module site cannot be deleted", line=stmt.lineno)
        return self._rewrite_generic(stmt, region)

    def _rewrite_generic(self, stmt: ast.stmt, region: int) -> ast.stmt:
        """Sites in the statement's own expressions, then in each block it holds (``try``
        and its handlers, ``with``, ``match`` and its cases: their guards included)."""
        blocks = child_blocks(stmt)
        for field, value in ast.iter_fields(stmt):
            if isinstance(value, list) and value and isinstance(value[0], (
                    ast.stmt, ast.excepthandler, ast.match_case)):
                continue
            if isinstance(value, list):
                setattr(stmt, field, [self.expr(v) if isinstance(v, ast.AST) else v for v in value])
            elif isinstance(value, ast.AST):
                setattr(stmt, field, self.expr(value))
        for field, holder, block in blocks:
            if holder is not stmt:   # a handler's type, a case's guard
                for name in ("type", "guard"):
                    if getattr(holder, name, None) is not None:
                        setattr(holder, name, self.expr(getattr(holder, name)))
            setattr(holder, field, self.block(block, region))
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
        stmt.test = bridge_call("branch", [ast.Constant(rid), self.expr(stmt.test)], stmt.test)
        return self._body_and_else(stmt, rid, region)

    def _rewrite_for(self, stmt: ast.For, region: int) -> ast.stmt:
        steps = (isinstance(stmt.iter, ast.Call) and isinstance(stmt.iter.func, ast.Attribute)
                 and stmt.iter.func.attr == "steps" and isinstance(stmt.iter.func.value, ast.Name)
                 and stmt.iter.func.value.id == TRACER)
        label = f"for {ast.unparse(stmt.target)} in {ast.unparse(stmt.iter)}"
        rid = self._sub_region("steps" if steps else "for", stmt, label, region)
        stmt.target = self.expr(stmt.target)
        stmt.iter = bridge_call("loop", [ast.Constant(rid), self.expr(stmt.iter)], stmt.iter)
        return self._body_and_else(stmt, rid, region)

    def _rewrite_while(self, stmt: ast.While, region: int) -> ast.stmt:
        rid = self._sub_region("while", stmt, f"while {ast.unparse(stmt.test)}", region)
        stmt.test = bridge_call("branch", [ast.Constant(rid), self.expr(stmt.test)], stmt.test)
        return self._body_and_else(stmt, rid, region)

    def _rewrite_def(self, stmt, region: int) -> ast.stmt:
        rid = self._sub_region("def", stmt, f"def {stmt.name}", region)
        stmt.decorator_list = [self.expr(d) for d in stmt.decorator_list]
        stmt.args.defaults = [self.expr(d) for d in stmt.args.defaults]
        stmt.body = self.block(stmt.body, rid)
        return stmt

    def _rewrite_assign(self, stmt: ast.Assign) -> ast.stmt:
        if self._grows(stmt):
            return self._growing_list(stmt)
        site_targets = [t for t in stmt.targets if self.site_of(t) or self._site_subscript(t)]
        if not site_targets:
            return self._rewrite_generic(stmt, self.region)
        if len(stmt.targets) != 1:
            raise CellSyntaxError("assign one module site at a time "
                                  "(`m.output = value`, not `a = m.output = value`)",
                                  line=stmt.lineno)
        target, value = stmt.targets[0], self.expr(stmt.value)
        site = self.site_of(target)
        if site is not None:
            chain, attr = site
            sid = self.add_site(chain, attr, "write", target)
            call = bridge_call("write", [self.chain_expr(chain), ast.Constant(attr), value,
                                          ast.Constant(sid)], stmt)
            return self._arrive(chain, attr, sid, stmt) + [locate(ast.Expr(call), stmt)]
        chain, attr = self.site_of(target.value)
        sid = self.add_site(chain, attr, "edit", target)
        call = bridge_call("setitem", [self.chain_expr(chain), ast.Constant(attr),
                                        index_expr(self.expr(target.slice)), value,
                                        ast.Constant(sid)], stmt)
        return self._arrive(chain, attr, sid, stmt) + [locate(ast.Expr(call), stmt)]

    def _grows(self, stmt: ast.Assign) -> bool:
        """``name = [... for ...]`` where other invokes read ``name``: they see it grow."""
        rule = self.rule()
        return (rule is not None and len(stmt.targets) == 1 and isinstance(stmt.value, ast.ListComp)
                and isinstance(stmt.targets[0], ast.Name) and stmt.targets[0].id in rule.flow_out)

    def _growing_list(self, stmt: ast.Assign) -> list[ast.stmt]:
        """``name = []``, bound now, then filled item by item as the forward reaches each one
        (a layer-by-layer list another invoke reads at that layer of the same forward)."""
        name = stmt.targets[0].id
        items = self.expr(ast.GeneratorExp(elt=stmt.value.elt, generators=stmt.value.generators))
        empty = locate(ast.Assign([ast.Name(name, ast.Store())], ast.List([], ast.Load())), stmt)
        fill = bridge_call("fill", [ast.Name(name, ast.Load()), locate(items, stmt.value)], stmt)
        return [empty, *self._bound({name}, stmt), locate(ast.Expr(fill), stmt)]

    def _arrive(self, chain: ast.AST, attr: str, sid: int, stmt: ast.stmt) -> list[ast.stmt]:
        """Wait for the site *before* computing the value written to it, when that value
        uses a name another invoke binds: what that invoke reads at this moment of the
        forward (reads are served first) is then available."""
        rule = self.rule()
        if rule is None or not statement_names(stmt)[1] & rule.arrive:
            return []
        call = bridge_call("arrive", [self.chain_expr(chain), ast.Constant(attr),
                                      ast.Constant(sid)], stmt)
        return [locate(ast.Expr(call), stmt)]

    def _rewrite_augassign(self, stmt: ast.AugAssign) -> ast.stmt:
        site = self.site_of(stmt.target)
        if site is None:
            if self._site_subscript(stmt.target):
                chain, attr = self.site_of(stmt.target.value)
                sid = self.add_site(chain, attr, "edit", stmt.target)
                stmt.target.value = self.read_call(chain, attr, sid, stmt.target.value)
                stmt.target.slice = self.expr(stmt.target.slice)
                stmt.value = self.expr(stmt.value)
                return stmt
            return self._rewrite_generic(stmt, self.region)
        op = _AUG_OPS.get(type(stmt.op))
        if op is None:
            raise CellSyntaxError(f"`{ast.unparse(stmt)}`: this operator cannot update a "
                                  "module site in place", line=stmt.lineno)
        chain, attr = site
        sid = self.add_site(chain, attr, "edit", stmt.target)
        call = bridge_call("augment", [self.chain_expr(chain), ast.Constant(attr),
                                        ast.Constant(op), self.expr(stmt.value),
                                        ast.Constant(sid)], stmt)
        return self._arrive(chain, attr, sid, stmt) + [locate(ast.Expr(call), stmt)]

    # expressions

    def expr(self, node: ast.AST) -> ast.AST:
        return ExprRewriter(self).visit(node)

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

    def site_of(self, node: ast.AST) -> tuple[ast.AST, str] | None:
        """(chain node, attr) when ``node`` is ``<model chain>.output|input|inputs``."""
        if (isinstance(node, ast.Attribute) and node.attr in SITE_ATTRS
                and self.chain(node.value) is not None):
            return node.value, node.attr
        return None

    def _site_subscript(self, node: ast.AST) -> bool:
        return isinstance(node, ast.Subscript) and self.site_of(node.value) is not None

    def chain_expr(self, chain: ast.AST) -> ast.AST:
        """The chain itself, with any expressions inside its indices rewritten."""
        return self.expr(chain)

    def add_site(self, chain: ast.AST | None, attr: str, access: str, node: ast.AST) -> int:
        parts = tuple(self.chain(chain)) if chain is not None else ()
        sid = len(self.graph.sites)
        self.graph.sites.append(Site(
            sid, node.lineno, format_path(parts), attr, access, self.invoke, self.region,
            self.statement, symbolic=any(k == "sym" for k, _ in parts)))
        self.parts[sid] = parts
        return sid

    def read_call(self, chain: ast.AST, attr: str, sid: int, node: ast.AST) -> ast.Call:
        return bridge_call("read", [self.chain_expr(chain), ast.Constant(attr),
                                     ast.Constant(sid)], node)
