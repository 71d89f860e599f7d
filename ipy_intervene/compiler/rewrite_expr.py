"""The rewriting of one expression: each module site in it becomes a call on the runtime
bridge ``__ii__`` (``model.h[0].output`` -> ``__ii__.read(model.h[0], "output", site_id)``),
recorded in the graph by the statement walk of ``rewrite.py``.
"""

from __future__ import annotations

import ast
import copy
from typing import Any, Protocol

from ipy_intervene.compiler.syntax import BRIDGE, TRACER, Part, bridge_call, locate
from ipy_intervene.errors import CellSyntaxError


class SiteBuilder(Protocol):
    """What the expression rewriter asks of the statement walk that records the graph
    (``rewrite.py``'s builder): so this module never imports that one."""

    def chain(self, node: ast.AST) -> list[Part] | None: ...
    def site_of(self, node: ast.AST) -> tuple[ast.AST, str] | None: ...
    def add_site(self, chain: Any, attr: str, access: str, node: ast.AST) -> int: ...
    def read_call(self, chain: ast.AST, attr: str, site_id: int, node: ast.AST) -> ast.expr: ...
    def chain_expr(self, node: ast.AST) -> ast.expr: ...
    def rule(self) -> Any: ...


class ExprRewriter(ast.NodeTransformer):
    """Rewrites the sites inside one expression into calls on ``__ii__``."""

    def __init__(self, builder: SiteBuilder) -> None:
        self.b = builder

    def visit_Name(self, node: ast.Name) -> ast.AST:
        """``tracer`` is ``__ii__.tracer``: nothing named ``tracer`` enters the namespace."""
        if node.id != TRACER:
            return node
        if not isinstance(node.ctx, ast.Load):
            raise CellSyntaxError("`tracer` is the running trace in a %%trace cell; use another "
                                  "name for your own variable", line=node.lineno)
        bridge = locate(ast.Name(BRIDGE, ast.Load()), node)
        return locate(ast.Attribute(value=bridge, attr="tracer", ctx=ast.Load()), node)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if isinstance(node.ctx, ast.Load):
            site = self.b.site_of(node)
            if site is not None:
                chain, attr = site
                return self.b.read_call(chain, attr, self.b.add_site(chain, attr, "read", node),
                                         node)
            if (node.attr == "output" and isinstance(node.value, ast.Name)
                    and node.value.id == TRACER):
                sid = self.b.add_site(None, "model_output", "read", node)
                return bridge_call("model_output", [ast.Constant(sid)], node)
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "skip" and self.b.chain(func.value) is not None:
            if len(node.args) != 1 or node.keywords:
                raise CellSyntaxError("write a skip as `module.skip(value)`: one value, the "
                                      "output the module would have produced", line=node.lineno)
            sid = self.b.add_site(func.value, "skip", "skip", node)
            return bridge_call("skip", [self.b.chain_expr(func.value), self.visit(node.args[0]),
                                         ast.Constant(sid)], node)
        if (isinstance(func, ast.Attribute) and func.attr == "stop" and not node.args
                and not node.keywords and isinstance(func.value, ast.Name)
                and func.value.id == TRACER):
            return bridge_call("stop", [ast.Constant(node.lineno)], node)
        if self._shared_append(node):
            return bridge_call("append", [self.visit(func.value), ast.Constant(func.attr),
                                          self.visit(node.args[0])], node)
        if self._shared_length(node):
            return bridge_call("length", [self.visit(func), self.visit(node.args[0]),
                                          ast.Constant(node.lineno)], node)
        chain = self.b.chain(func)
        if chain:
            sid = self.b.add_site(func, "call", "call", node)
            call = bridge_call("call", [self.b.chain_expr(func), ast.Constant(sid)], node)
            call.args += [self.visit(a) for a in node.args]
            call.keywords = [self.visit(k) for k in node.keywords]
            return call
        return self.generic_visit(node)

    def _shared_append(self, node: ast.Call) -> bool:
        """``xs.append(v)`` / ``xs.extend(vs)`` (also ``d["k"].append(v)``) in an invoke, on
        a list it did not make: several invokes may fill it, so when the forward ends its
        items are put in invoke order (not the order the forward happened to reach them)."""
        func, rule = node.func, self.b.rule()
        if (rule is None or not isinstance(func, ast.Attribute)
                or func.attr not in ("append", "extend") or len(node.args) != 1 or node.keywords):
            return False
        root = func.value
        while isinstance(root, (ast.Attribute, ast.Subscript)):
            root = root.value
        return isinstance(root, ast.Name) and root.id not in rule.own

    def _shared_length(self, node: ast.Call) -> bool:
        """``len(xs)`` in an invoke, of a list it did not make: an index taken from it during
        the forward is checked against the invoke order the list ends in."""
        if (self.b.rule() is None or not isinstance(node.func, ast.Name)
                or node.func.id != "len" or len(node.args) != 1 or node.keywords):
            return False
        root = node.args[0]
        while isinstance(root, (ast.Attribute, ast.Subscript)):
            root = root.value
        return isinstance(root, ast.Name) and root.id not in self.b.rule().own

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        """``layer.output[0]``: checked at run time (see :func:`habits.check_row0`)."""
        site = self.b.site_of(node.value) if isinstance(node.ctx, ast.Load) else None
        if (site is None or site[1] != "output" or not isinstance(node.slice, ast.Constant)
                or type(node.slice.value) is not int or node.slice.value != 0):
            return self.generic_visit(node)
        envoy = self.b.chain_expr(copy.deepcopy(site[0]))
        return bridge_call("row0", [self.visit(node.value), envoy], node)
