"""The cell language shared by the compiler and the rewriter: reserved names, module
paths, the names a statement binds and reads, and small helpers that build bridge calls.

>>> format_path((("attr", "transformer"), ("attr", "h"), ("index", 2), ("key", "q")))
"transformer.h[2]['q']"
>>> defs, uses = statement_names(ast.parse("for i in range(n): x = i").body[0])
>>> sorted(defs), sorted(uses)
(['i'], ['n', 'range'])
"""

from __future__ import annotations

import ast
from types import CodeType

BRIDGE = "__ii__"
TRACER = "tracer"
SITE_ATTRS = ("output", "input", "inputs")
INTERNAL_NAMES = frozenset({BRIDGE, TRACER, "__builtins__"})

Part = tuple[str, object]  # ("attr", "h") | ("index", 2) | ("key", "q") | ("sym", "l")


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


def header_parts(stmt: ast.stmt) -> list[ast.AST]:
    """The parts of a statement that run when the statement itself runs (not its body)."""
    if isinstance(stmt, (ast.If, ast.While)):
        return [stmt.test]
    if isinstance(stmt, ast.Match):
        return [stmt.subject]
    if isinstance(stmt, (ast.For, ast.AsyncFor)):
        return [stmt.target, stmt.iter]
    if isinstance(stmt, (ast.With, ast.AsyncWith)):
        return list(stmt.items)
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return list(stmt.decorator_list)
    if isinstance(stmt, ast.Try):
        return []
    return [stmt]


def child_blocks(stmt: ast.stmt) -> list[tuple[str, ast.AST, list[ast.stmt]]]:
    """The blocks of statements a compound statement holds, as ``(field, holder, block)``:
    ``holder.<field>`` is ``block``. The holder is the statement itself (``body``,
    ``orelse``, ``finalbody``), an ``except`` handler or a ``match`` case (their ``body``).
    A simple statement has none. The one walk every pass of the compiler uses.

    >>> stmt = ast.parse("match x:\n    case 1:\n        a = 1\n    case _:\n        b = 2").body[0]
    >>> [(field, type(holder).__name__, len(block)) for field, holder, block in child_blocks(stmt)]
    [('body', 'match_case', 1), ('body', 'match_case', 1)]
    """
    out: list[tuple[str, ast.AST, list[ast.stmt]]] = []
    for field, value in ast.iter_fields(stmt):
        if not isinstance(value, list) or not value:
            continue
        if isinstance(value[0], ast.stmt):
            out.append((field, stmt, value))
        elif isinstance(value[0], (ast.excepthandler, ast.match_case)):
            out.extend(("body", holder, holder.body) for holder in value)
    return out


def statement_names(stmt: ast.stmt) -> tuple[set[str], set[str]]:
    """(defs, uses) of a statement's own header (a compound statement's body is separate)."""
    defs: set[str] = set()
    uses: set[str] = set()
    for part in header_parts(stmt):
        stored, loaded = _names(part)
        defs |= stored
        uses |= loaded
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        defs.add(stmt.name)
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        defs |= {(a.asname or a.name).split(".")[0] for a in stmt.names}
    return defs, uses


def all_defs(body: list[ast.stmt]) -> set[str]:
    """Every name bound in ``body``, nested blocks included (a function or class defined
    there binds its name; what its own body binds is its own)."""
    out: set[str] = set()
    todo: list[ast.AST] = list(body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.stmt):
            out |= statement_names(node)[0]
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                 ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return out


def all_uses(body: list[ast.stmt]) -> set[str]:
    """Every name read anywhere in ``body``."""
    out: set[str] = set()
    for stmt in body:
        out |= _names(stmt)[1]
    return out


# -- building bridge calls --------------------------------------------------------------------

def locate(node: ast.AST, like: ast.AST) -> ast.AST:
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


def bridge_call(method: str, args: list[ast.expr], node: ast.AST) -> ast.Call:
    call = ast.Call(func=ast.Attribute(value=ast.Name(BRIDGE, ast.Load()), attr=method,
                                       ctx=ast.Load()), args=args, keywords=[])
    return locate(call, node)


def index_expr(slice_node: ast.expr) -> ast.expr:
    """``__ii__.index[<slice>]``: turns slice syntax into a value."""
    bridge_index = ast.Attribute(value=ast.Name(BRIDGE, ast.Load()), attr="index", ctx=ast.Load())
    return locate(ast.Subscript(value=bridge_index, slice=slice_node, ctx=ast.Load()), slice_node)


def compile_module(body: list[ast.stmt], filename: str) -> CodeType:
    """Compile rewritten statements as a module (filling in locations if one is missing)."""
    module = ast.Module(body=body, type_ignores=[])
    try:
        return compile(module, filename, "exec")
    except TypeError:  # a node without a location slipped through: fill them all
        return compile(ast.fix_missing_locations(module), filename, "exec")
