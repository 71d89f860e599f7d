"""Parsing a magic line: ``MODEL [INPUT] [--options]`` where MODEL and INPUT are Python.

>>> TraceCommand.parse('model "After John and Mary went" --generate 3')
TraceCommand(model='model', input='"After John and Mary went"', options='--generate 3')
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass

from IPython.core.error import UsageError

_OPEN, _CLOSE = "([{", ")]}"


@dataclass(frozen=True)
class TraceCommand:
    model: str
    input: str | None
    options: str

    @classmethod
    def parse(cls, line: str, magic: str = "%%trace") -> "TraceCommand":
        head, options = split_options(line)
        if not head.strip():
            raise UsageError(f"{magic} needs a MODEL: {magic} model [INPUT] [options]")
        model, input_ = split_expressions(head, magic)
        return cls(model, input_, options)


def _tokens(text: str) -> list[tokenize.TokenInfo]:
    try:
        return [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
                if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    except (tokenize.TokenError, IndentationError, SyntaxError) as exc:
        raise UsageError(f"cannot read the magic line {text!r}: {exc}") from None


def split_options(line: str) -> tuple[str, str]:
    """(expressions, options): options start at the first ``--name`` outside brackets."""
    depth = 0
    tokens = _tokens(line)
    for i, tok in enumerate(tokens):
        if tok.string in _OPEN:
            depth += 1
        elif tok.string in _CLOSE:
            depth -= 1
        elif (depth == 0 and tok.string == "-" and i + 2 < len(tokens)
              and tokens[i + 1].string == "-" and tokens[i + 1].start[1] == tok.end[1]
              and tokens[i + 2].type == tokenize.NAME
              and (i == 0 or line[tok.start[1] - 1].isspace())):
            return line[: tok.start[1]].strip(), line[tok.start[1]:].strip()
    return line.strip(), ""


def split_expressions(head: str, magic: str) -> tuple[str, str | None]:
    """MODEL and an optional INPUT: the first split at top-level whitespace where both sides
    are expressions (so ``model [p1, p2]`` is a model and a batch, not a subscript)."""
    depth = 0
    for tok in _tokens(head):
        col = tok.start[1]
        if depth == 0 and col > 0 and head[col - 1].isspace():
            left, right = head[:col].strip(), head[col:].strip()
            if _is_expr(left) and _is_expr(right):
                return left, right
        if tok.string in _OPEN:
            depth += 1
        elif tok.string in _CLOSE:
            depth -= 1
    if _is_expr(head):
        return head, None
    raise UsageError(f"{magic}: cannot read {head!r} as MODEL [INPUT]: each must be a Python "
                     "expression, e.g. %%trace model \"a prompt\"")


def _is_expr(text: str) -> bool:
    try:
        ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    return True


@dataclass(frozen=True)
class SweepCommand:
    """``%patch_sweep MODEL --clean X --corrupted Y --metric M [--option VALUE ...]``.

    Each option's value is the text up to the next top-level ``--name``, so values can be any
    Python expression, spaces and all.

    >>> SweepCommand.parse('model --clean c --metric logit_diff("Mary", "John") --site mlp_out')
    SweepCommand(model='model', options={'clean': 'c', 'metric': 'logit_diff("Mary", "John")', 'site': 'mlp_out'})
    """

    model: str
    options: dict[str, str]

    @classmethod
    def parse(cls, line: str, magic: str = "%patch_sweep") -> "SweepCommand":
        head, rest = split_options(line)
        if not head.strip():
            raise UsageError(f"{magic} needs a MODEL: {magic} model --clean X --corrupted Y "
                             "--metric M")
        if not _is_expr(head):
            raise UsageError(f"{magic}: MODEL {head!r} is not a Python expression")
        options: dict[str, str] = {}
        while rest:
            name_end = len(rest.split(None, 1)[0])
            name = rest[2:name_end].replace("-", "_")
            value, rest = split_options(rest[name_end:])
            if name in options:
                raise UsageError(f"{magic}: --{name} is given twice")
            options[name] = value.strip()
        return cls(head.strip(), options)
