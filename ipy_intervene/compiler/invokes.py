"""A cell's invokes and the one rule for their names.

**Every name an invoke binds is that invoke's own** (each item of a loop of invokes is an
invoke); an invoke reads a name it does not bind from the one invoke that binds it (live, as
the forward runs), and it is an error when several invokes (or every item of a loop) bind it.
Other names an invoke reads are the notebook's, as they were when its ``with`` line was
reached (loop variables, and lists created between invokes, included).

Statements between invoke blocks run before the forward, in order, as they are written (so
``for layer in range(n): with tracer.invoke(x): ...`` registers one invoke per item, and
``results = []`` between blocks is a list every invoke can append to); statements after the
last invoke run after the forward.

>>> import ast
>>> tree = ast.parse("with tracer.invoke(a):\\n    x = 1\\nfor p in ps:\\n"
...                  "    with tracer.invoke(p):\\n        y = x\\n")
>>> setup, blocks, after = find_blocks(tree, has_input=False)
>>> [(b.line, b.multi) for b in blocks], [sorted(n.flow_in) for n in name_rules(blocks, setup)[0]]
([(1, False), (4, True)], [[], ['x']])
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from ipy_intervene.compiler.invoke_setup import Block, Timeline, check_setup, mutated
from ipy_intervene.compiler.syntax import TRACER, all_defs, all_uses, child_blocks
from ipy_intervene.errors import CellSyntaxError


@dataclass
class InvokeNames:
    """How one block's names are bound (see the module docstring)."""

    own: set[str]          # bound by this block: its own, published after the forward
    flow_in: set[str]      # read from the one other invoke that binds them (live globals)
    flow_out: set[str]     # bound here and read by other invokes (declared global)
    params: tuple[str, ...]  # captured when the invoke is registered
    arrive: set[str]       # names another invoke may change while the forward runs


# -- finding the blocks ---------------------------------------------------------------------

def invoke_input(stmt: ast.AST) -> ast.expr | None:
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


def find_blocks(tree: ast.Module, has_input: bool
                ) -> tuple[list[ast.stmt], list[Block], list[ast.stmt]]:
    """(setup, blocks, after): the statements up to the last one holding an invoke (they run
    before the forward), the invoke blocks in the order they are written, and the rest."""
    blocks: list[Block] = []
    holders = [i for i, stmt in enumerate(tree.body) if _collect(stmt, [], blocks)]
    if has_input:
        if blocks:
            raise CellSyntaxError("INPUT is given on the magic line and the cell also has "
                                  "`tracer.invoke` blocks: use one or the other",
                                  line=blocks[0].line)
        return [], [], tree.body
    if not blocks:
        raise CellSyntaxError("no INPUT on the magic line and no `with tracer.invoke(INPUT):` "
                              "block in the cell: write `%%trace model \"a prompt\"` or add "
                              "invoke blocks")
    last = holders[-1]
    return tree.body[:last + 1], blocks, tree.body[last + 1:]


def _collect(stmt: ast.stmt, loops: list[ast.stmt], blocks: list[Block]) -> bool:
    """Add the invoke blocks inside ``stmt`` to ``blocks``; whether there were any."""
    x = invoke_input(stmt)
    if x is not None:
        _reject_inner_invokes(stmt.body)
        blocks.append(Block(len(blocks), stmt, x, list(loops)))
        return True
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        _reject_inner_invokes([stmt])
        return False
    inner = loops + [stmt] if isinstance(stmt, (ast.For, ast.While)) else loops
    found = False
    for field, _, block in child_blocks(stmt):
        here = inner if field != "orelse" else loops
        for child in block:
            found |= _collect(child, here, blocks)
    if found and isinstance(stmt, (ast.AsyncFor, ast.AsyncWith, ast.With)):
        raise CellSyntaxError("invoke blocks can be inside `for`, `while`, `if` and `try` "
                              "statements, not inside another `with`", line=stmt.lineno)
    return found


def _reject_inner_invokes(body: list[ast.stmt]) -> None:
    for node in (n for stmt in body for n in ast.walk(stmt)):
        if isinstance(node, ast.With) and invoke_input(node) is not None:
            raise CellSyntaxError("`with tracer.invoke(...)` cannot be inside another invoke or "
                                  "a function: put it at the top of the cell (or in a loop "
                                  "there)", line=node.lineno)


# -- the names rule -------------------------------------------------------------------------

def name_rules(blocks: list[Block], setup: list[ast.stmt]
               ) -> tuple[list[InvokeNames], set[str]]:
    """Each block's names under the rule; a ``CellSyntaxError`` naming the name and the lines
    where a read could come from several invokes, or the set-up would need a value the
    forward has not made yet; and the set-up names whose value differs between invokes
    (each invoke's value is the notebook's while its code runs, for functions that read it)."""
    defs = [all_defs(b.body) for b in blocks]
    uses = [all_uses(b.body) for b in blocks]
    timeline = Timeline(setup, blocks)
    check_setup(timeline, blocks, uses, defs)
    rules = [InvokeNames(own=defs[k], flow_in=_flow_in(timeline, block, uses[k] - defs[k]),
                         flow_out=set(), params=(), arrive=set())
             for k, block in enumerate(blocks)]
    for k, rule in enumerate(rules):
        rule.flow_out = {n for n in defs[k] if any(n in r.flow_in for r in rules)}
        captured = uses[k] - (rule.flow_in | rule.flow_out | _declared_global(blocks[k].body))
        rule.params = tuple(sorted(n for n in captured if n in timeline.bindings))
        rule.arrive = rule.flow_in | _changed_by_others(k, blocks, uses[k] - defs[k])
    return rules, timeline.varying()


def _flow_in(timeline: Timeline, reader: Block, reads: set[str]) -> set[str]:
    """The names ``reader`` takes, live, from the one other invoke that binds them, when that
    is the binding it sees as written (the nearest above it, or, with none above, below)."""
    loops = tuple(id(x) for x in reader.loops)
    flow = set()
    for name in sorted(reads):
        seen = timeline.latest(name, reader.line, loops) or timeline.later(name, reader.line)
        if all(b.block is None for b in seen):
            continue  # the set-up's (or the notebook's) value, captured at registration
        binders = [b.block for b in timeline.bindings[name] if b.block is not None]
        setup = [b.line for b in seen if b.block is None]
        if setup or len(binders) > 1 or binders[0].multi:
            raise _ambiguous(name, reader, binders, setup)
        flow.add(name)
    return flow


def _ambiguous(name: str, reader: Block, binders: list[Block],
               setup: list[int]) -> CellSyntaxError:
    line = min((n.lineno for s in reader.body for n in ast.walk(s)
                if isinstance(n, ast.Name) and n.id == name), default=reader.line)
    who = " and ".join([f"the statement at line {n} (before the forward)" for n in setup]
                       + [b.describe() for b in binders])
    return CellSyntaxError(
        f"`{name}` is read here by the invoke at line {reader.line}, but {who} "
        f"{'binds' if len(binders) + len(setup) == 1 else 'bind'} it: every name an "
        "invoke binds is that invoke's own, so which value is meant is ambiguous. Give each "
        f"value its own name, bind `{name}` in one invoke block (not in a loop of invokes), or "
        f"collect the values in a list created before the invokes (`{name}s = []`, then "
        f"`{name}s.append(...)` in each)", line=line)


def _declared_global(body: list[ast.stmt]) -> set[str]:
    return {n for s in body for node in ast.walk(s) if isinstance(node, ast.Global)
            for n in node.names}


def _changed_by_others(k: int, blocks: list[Block], shared: set[str]) -> set[str]:
    """Names ``k`` reads (without binding) that another invoke changes in place: a list it
    appends to, a tensor it edits (``x[...] = v``, ``x.add_(v)``)."""
    others = [b for b in blocks if b.index != k or b.multi]
    return {name for b in others for stmt in b.body for name in mutated(stmt) if name in shared}
