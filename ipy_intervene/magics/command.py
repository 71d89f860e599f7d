"""Parsing a magic line: ``MODEL [INPUT] [--options]`` where MODEL and INPUT are Python.

>>> TraceCommand.parse('model "After John and Mary went" --generate 3')
TraceCommand(model='model', input='"After John and Mary went"', options='--generate 3')
"""

from __future__ import annotations

import ast
import difflib
import io
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Any, Callable

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

    def split_generation(self, magic: str = "%%trace") -> tuple["TraceCommand", dict[str, str]]:
        """This command without its generation options (``GENERATE_OPTIONS``), and those
        options' texts by name (:func:`generate_values` reads them).

        >>> TraceCommand.parse("model 'x' --generate 3 --do-sample --seed 1").split_generation()
        (TraceCommand(model='model', input="'x'", options='--generate 3'), {'do_sample': '', 'seed': '1'})
        """
        kept, found, rest = [], {}, self.options
        while rest:
            name_text = rest.split(None, 1)[0]
            name = name_text[2:].replace("-", "_")
            value, rest = split_options(rest[len(name_text):])
            if name in GENERATE_OPTIONS:
                option = GENERATE_OPTIONS[name]
                if name in found:
                    raise UsageError(f"{magic}: {option.flag} is given twice")
                option.check(value.strip(), magic)
                found[name] = value.strip()
            else:
                kept.append(f"{name_text} {value}".strip())
        return TraceCommand(self.model, self.input, " ".join(kept)), found


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


# -- options: one table parses the line and writes the manual -------------------------------

WORD, EXPRESSION, NAME, FLAG = "word", "expression", "name", "flag"


@dataclass(frozen=True)
class Option:
    """One ``--option`` of a line magic: how its value is read, and its line in the manual.

    Kinds: WORD (taken as written, quotes optional), EXPRESSION (Python, evaluated in the
    notebook), NAME (a Python name, as written) and FLAG (no value).

    >>> opt = Option("batch_size", EXPRESSION, "N", "grid cells per forward", "all")
    >>> opt.flag, opt.usage
    ('--batch-size', '--batch-size N')
    >>> opt.help_line(width=60)
    '  --batch-size N   grid cells per forward (default: all)'
    """

    name: str                # the Python name: batch_size for --batch-size
    kind: str
    metavar: str = ""
    help: str = ""
    default: str = ""        # described, for the manual
    required: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def usage(self) -> str:
        return self.flag if self.kind == FLAG else f"{self.flag} {self.metavar}"

    def help_line(self, width: int = 90) -> str:
        """The option's entry in the manual, wrapped under its help column."""
        text = self.help + (f" (default: {self.default})" if self.default else "")
        return textwrap.fill(text, width, initial_indent=f"  {self.usage:<16} ",
                             subsequent_indent=" " * 19)

    def check(self, text: str, magic: str) -> None:
        """A UsageError if ``text`` cannot be this option's value (before anything runs)."""
        if self.kind == FLAG:
            if text:
                raise UsageError(f"{magic}: {self.flag} takes no value")
        elif not text:
            raise UsageError(f"{magic}: {self.flag} needs a value: {self.usage}")
        elif self.kind == NAME and not _word(text).isidentifier():
            raise UsageError(f"{magic}: {self.flag} {text!r} is not a valid Python name")

    def read(self, text: str, evaluate: Callable[[str, str], Any]) -> Any:
        """The value: True for a flag, the text of a word or name, ``evaluate(text, flag)``
        for an expression."""
        if self.kind == FLAG:
            return True
        if self.kind == EXPRESSION:
            return evaluate(text, self.flag)
        return _word(text)


def _word(text: str) -> str:
    """``mlp_out`` or ``"mlp_out"``: the same word."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, str) else text


_NOISE = "--method noise: "
SWEEP_OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("clean", EXPRESSION, "X", "the clean prompt(s): a string, a list of strings or token "
           "ids", required=True),
    Option("corrupted", EXPRESSION, "Y", "the corrupted prompt(s), token for token as long as the "
           "clean ones (not used with --method noise)"),
    Option("metric", EXPRESSION, "M", "logit_diff(correct, wrong), prob(token), logprob(token) "
           "(one answer, or one per prompt), or a callable from logits [batch, pos, vocab] to "
           "one number per prompt", "with --method noise, the probability of the clean prediction"),
    Option("site", WORD, "S", "resid_pre, resid_mid, resid_post, attn_out, mlp_out ([layer, "
           "pos]); head_out, head_q, head_k, head_v, head_pattern ([layer, head]); "
           "head_out_pos, head_q_pos, ... ([layer, pos, head]); the latents of an ii.attach "
           "splice: sae, sae:transformer.h[2] ([latent, pos]); several, comma-separated "
           "(a dict of results)", "resid_pre"),
    Option("method", WORD, "M", "activation (exact), attribution ((clean - corrupted) . grad, "
           "from two forwards and one backward), atp* (AtP*: attribution with the QK fix and "
           "GradDrop), noise (ROME causal tracing) or path (path patching from every head to "
           "--receivers)", "activation"),
    Option("receivers", EXPRESSION, "R", "with --method path: logits, or [(layer, head), ...] "
           "whose --receiver-input is patched", "logits"),
    Option("receiver_input", WORD, "Q", "with --method path: q, k or v", "q"),
    Option("direction", WORD, "D", "denoising (clean into corrupted) or noising (corrupted "
           "into clean)", "denoising"),
    Option("layers", EXPRESSION, "L", "the layers to sweep, e.g. range(2, 4)", "all"),
    Option("positions", EXPRESSION, "P", "the positions to sweep, e.g. [-1, 10]", "all"),
    Option("heads", EXPRESSION, "H", "the heads to sweep, for head sites", "all"),
    Option("latents", EXPRESSION, "K", "the latents to sweep, for latent sites (or the "
           "coordinates of --dictionary)", "all"),
    Option("dictionary", EXPRESSION, "D", "a custom site at every layer of --site: "
           "ii.Direction(v), ii.Subspace(basis), ii.Neurons(ids, d_in), ii.Custom(enc, dec)"),
    Option("qk_fix", EXPRESSION, "B", "with --method atp*: recompute attention patterns "
           "exactly for queries and keys", "True"),
    Option("grad_drop", EXPRESSION, "B", "with --method atp*: GradDrop over the layers",
           "True"),
    Option("subject", EXPRESSION, "S", _NOISE + "the subject's text (or its token positions) "
           "to noise"),
    Option("samples", EXPRESSION, "N", _NOISE + "noised copies of the clean run", "10"),
    Option("noise", EXPRESSION, "K", _NOISE + "the noise's std, as a multiple of the std of "
           "the subject's token embeddings", "3"),
    Option("noise_std", EXPRESSION, "SD", _NOISE + "the noise's std itself, instead of "
           "--noise K"),
    Option("seed", EXPRESSION, "N", _NOISE + "the noise's seed", "0"),
    Option("window", EXPRESSION, "W", "layers restored together around each layer "
           "(activation patching and causal tracing)", "1"),
    Option("batch_size", EXPRESSION, "N", "grid cells per batched forward",
           "what fits in a quarter of free memory"),
    Option("out", NAME, "NAME", "also store the SweepResult in NAME (it is always in _sweep)"),
    Option("quiet", FLAG, help="show nothing (the result is still returned and stored)"),
)}


@dataclass(frozen=True)
class SweepCommand:
    """``%patch_sweep MODEL --clean X --corrupted Y --metric M [--option VALUE ...]``.

    Each option's value is the text up to the next top-level ``--name``, so values can be any
    Python expression, spaces and all. Options are checked against ``SWEEP_OPTIONS`` here,
    before anything is evaluated.

    >>> SweepCommand.parse('model --clean c --metric logit_diff("Mary", "John") --site mlp_out')
    SweepCommand(model='model', options={'clean': 'c', 'metric': 'logit_diff("Mary", "John")', 'site': 'mlp_out'})
    """

    model: str
    options: dict[str, str]

    @staticmethod
    def table() -> dict[str, "Option"]:
        """The options this command takes (a subclass for another magic has its own)."""
        return SWEEP_OPTIONS

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
            option = _option(name, magic, cls.table())
            if name in options:
                raise UsageError(f"{magic}: {option.flag} is given twice")
            option.check(value.strip(), magic)
            options[name] = value.strip()
        for option in cls.table().values():
            if option.required and option.name not in options:
                raise UsageError(f"{magic} needs {option.usage}: {option.help}")
        return cls(head.strip(), options)

    def values(self, evaluate: Callable[[str, str], Any]) -> dict[str, Any]:
        """Each given option's value, in the order given (see ``Option.read``).

        >>> command = SweepCommand.parse("m --clean c --site 'mlp_out' --quiet")
        >>> command.values(lambda text, flag: text.upper())
        {'clean': 'C', 'site': 'mlp_out', 'quiet': True}
        """
        table = self.table()
        return {name: table[name].read(text, evaluate) for name, text in self.options.items()}


def _option(name: str, magic: str, table: dict[str, Option]) -> Option:
    if name in table:
        return table[name]
    flag = "--" + name.replace("_", "-")
    close = difflib.get_close_matches(name, table, n=1)
    hint = f" (did you mean {table[close[0]].flag}?)" if close else ""
    listing = ", ".join(o.flag for o in table.values())
    raise UsageError(f"{magic}: unknown option {flag}{hint}; options: {listing}")


def manual(magic: str, summary: str, options: dict[str, Option], examples: list[str]) -> str:
    """The ``magic?`` text: the usage line, ``summary``, then Options and Examples sections
    written from the option table.

    >>> print(manual("%m", "Does m.", {"q": Option("q", FLAG, help="quiet")}, ["%m x --q"]))
    %m MODEL [--q]
    <BLANKLINE>
    Does m.
    <BLANKLINE>
    Options
    -------
      --q              quiet
    <BLANKLINE>
    Examples
    --------
    In [1]: %m x --q
    """
    units = ["MODEL", *(o.usage if o.required else f"[{o.usage}]" for o in options.values())]
    usage = textwrap.fill(" ".join(u.replace(" ", "\N{NO-BREAK SPACE}") for u in units), 90,
                          initial_indent=magic + " ", subsequent_indent=" " * (len(magic) + 1),
                          break_on_hyphens=False)
    return "\n".join([
        usage.replace("\N{NO-BREAK SPACE}", " "),
        "", summary.strip(), "", "Options", "-------",
        *(o.help_line() for o in options.values()),
        "", "Examples", "--------",
        *(f"In [{i}]: {example}" for i, example in enumerate(examples, 1)),
    ])


GENERATE_OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("do_sample", FLAG, help="with --generate: sample the next token instead of taking "
           "the likeliest", default="off: greedy"),
    Option("temperature", EXPRESSION, "T", "with --do-sample: divide the logits by T", "1.0"),
    Option("top_p", EXPRESSION, "P", "with --do-sample: sample from the smallest set of tokens "
           "whose probability reaches P", "1.0"),
    Option("top_k", EXPRESSION, "K", "with --do-sample: sample from the K likeliest tokens", "50"),
    Option("seed", EXPRESSION, "N", "with --do-sample: draw what torch.manual_seed(N); "
           "model.generate(...) draws (the notebook's random state is left as it was)"),
    Option("generate_kwargs", EXPRESSION, "D", "with --generate: any other keyword of "
           "model.generate, as a dict, e.g. dict(repetition_penalty=1.2) (checked by name)"),
)}


def generate_values(texts: dict[str, str], evaluate: Callable[[str, str], Any]) -> dict[str, Any]:
    """The keywords for ``ii.trace``/``run_compiled(generate_options=...)`` from the texts
    :meth:`TraceCommand.split_generation` found; ``--generate-kwargs`` must be a dict.

    >>> generate_values({"do_sample": "", "seed": "1"}, lambda text, flag: eval(text))
    {'do_sample': True, 'seed': 1}
    """
    values: dict[str, Any] = {}
    for name, text in texts.items():
        value = GENERATE_OPTIONS[name].read(text, evaluate)
        if name != "generate_kwargs":
            values[name] = value
            continue
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UsageError(f"--generate-kwargs must be a dict of keyword names to values, "
                             f"e.g. dict(repetition_penalty=1.2); got {type(value).__name__}")
        twice = sorted(set(value) & set(texts))
        if twice:
            raise UsageError(f"--generate-kwargs sets {', '.join(twice)}, which the line sets "
                             "too: give each once")
        values.update(value)
    return values


EDGE_OPTIONS: dict[str, Option] = {o.name: o for o in (
    SWEEP_OPTIONS["clean"],
    Option("corrupted", EXPRESSION, "Y", "the corrupted prompt(s), token for token as long as "
           "the clean ones", required=True),
    Option("metric", EXPRESSION, "M", "logit_diff(correct, wrong), prob(token), "
           "logprob(token) or a callable from logits to one number per prompt (it needs a "
           "gradient)", required=True),
    Option("method", WORD, "M", "eap (2 forwards, 1 backward) or eap-ig (integrated "
           "gradients over --steps points)", "eap"),
    Option("steps", EXPRESSION, "N", "with --method eap-ig: the interpolation points", "5"),
    Option("direction", WORD, "D", "denoising (clean values into the corrupted run) or "
           "noising (corrupted into clean, the EAP papers' convention)", "denoising"),
    Option("out", NAME, "NAME", "also store the EdgeResult in NAME (it is always in _edges)"),
)}


@dataclass(frozen=True)
class EdgeCommand(SweepCommand):
    """``%edge_attribution MODEL --clean X --corrupted Y --metric M [--method eap-ig]``.

    >>> EdgeCommand.parse('model --clean c --corrupted k --metric m --method eap-ig')
    EdgeCommand(model='model', options={'clean': 'c', 'corrupted': 'k', 'metric': 'm', 'method': 'eap-ig'})
    """

    @staticmethod
    def table() -> dict[str, Option]:
        return EDGE_OPTIONS
