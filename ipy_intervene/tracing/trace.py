"""``ii.trace``: compile, validate, run and publish a trace cell; the ``%%trace`` magic's core.

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> ns = {"model": model}
>>> result = ii.trace(model, "h = model.transformer.h[1].output",
...                   "When Mary and John went to the store", namespace=ns)
>>> ns["h"].shape
torch.Size([1, 9, 128])
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Callable

from ipy_intervene.compiler.compile import CompiledCell, compile_cell
from ipy_intervene.compiler.graph import InterventionGraph
from ipy_intervene.compiler.validate import validate
from ipy_intervene.errors import InterventionError, cell_line
from ipy_intervene.habits.explain import check_other_models, explain
from ipy_intervene.infra.interrupts import holding, uninterruptible
from ipy_intervene.model.envoys import Model
from ipy_intervene.model.loading import warn_if_training, wrap
from ipy_intervene.model.provenance import remember
from ipy_intervene.runtime import NO_INPUT, Outcome, run_cell
from ipy_intervene.runtime.dry import run_dry
from ipy_intervene.runtime.generation import check as check_generate_options
from ipy_intervene.tracing.namespace import Bindings, bound_names


@dataclass
class TraceResult:
    """What a trace ran and produced. ``%%trace`` stores it in ``_trace`` (and ``--out``).

    ``names``: the names the cell published, ``output``: logits (or, with ``--generate``, the
    prompt's token ids followed by the generated ones; ``new_tokens`` has the generated ones
    alone, ``generated`` each prompt's up to its end-of-text), ``graph``: the intervention
    graph annotated with what ran, ``loss``: the model's loss when the INPUT (a dict) gave
    ``labels``. ``input_ids``/``attention_mask``: the batch (left-padded; ``lengths``: each
    row's tokens, ``positions``: :class:`~ipy_intervene.model.positions.Positions` of the batch).
    """

    graph: InterventionGraph
    names: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    steps: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    note: str = ""
    prompt_length: int | None = None   # positions of the (padded) prompt
    loss: Any = None
    input_ids: Any = None
    attention_mask: Any = None
    generating: bool = False
    eos: tuple[int, ...] = ()
    model: Any = field(default=None, repr=False)

    @property
    def new_tokens(self) -> Any:
        """The generated token ids ``[batch, steps]``, without the prompt (``--generate``);
        a prompt that stopped before the others has padding after its end-of-text.

        >>> model.tokenizer.decode(_trace.new_tokens[0])        # doctest: +SKIP
        'Mary . <|endoftext|>'
        """
        if not self.generating:
            raise InterventionError("new_tokens: this trace did not generate; run it with "
                                    "--generate N (or ii.trace(..., generate=N))")
        return self.output[:, self.prompt_length:]

    @property
    def generated(self) -> list[Any]:
        """Each prompt's new tokens, up to and including its end-of-text (its natural length).

        >>> [model.tokenizer.decode(t) for t in _trace.generated]   # doctest: +SKIP
        """
        out = []
        for row in self.new_tokens:
            ends = [i for i, t in enumerate(row.tolist()) if t in self.eos]
            out.append(row[: ends[0] + 1] if ends else row)
        return out

    @property
    def lengths(self) -> list[int]:
        """Each row's prompt length in tokens (without padding)."""
        if self.attention_mask is None:
            raise InterventionError("this trace has no token batch (a dry run, or tensor "
                                    "inputs)")
        return [int(n) for n in self.attention_mask.sum(1)]

    @property
    def positions(self) -> Any:
        """Where each prompt's tokens are in the padded batch (``ii.positions(_trace)``)."""
        from ipy_intervene.model.positions import positions

        return positions(self)

    def show_graph(self):
        """The intervention graph as a view (SVG when pygraphviz is installed, else DOT)."""
        from ipy_intervene.widgets.graph_view import GraphView

        return GraphView(self.graph)

    def summary(self) -> str:
        if self.dry_run:
            head = "dry run on fake tensors: shapes and indices checked, nothing computed or published"
            return "\n".join(filter(None, [head, self.note, self.graph.summary()]))
        lines = [f"TraceResult: {self.steps} step(s) in {self.seconds * 1000:.1f} ms"]
        for name, value in self.names.items():
            lines.append(f"  {name} = {_short(value)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<TraceResult names={list(self.names)} steps={self.steps} "
                f"dry_run={self.dry_run}>")

    def _repr_pretty_(self, p, cycle: bool) -> None:
        p.text(self.summary())


def _short(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"{type(value).__name__}{list(shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def trace(model: Any, source: str, input: Any = NO_INPUT, *, namespace: dict | None = None,
          model_name: str = "model", generate: int | None = None, ignore_eos: bool = False,
          grad: bool = False, dry_run: bool = False, filename: str = "<trace>",
          transform_ast: Callable[[ast.Module], ast.Module] | None = None,
          **generate_options: Any) -> TraceResult:
    """Run trace-cell ``source`` against ``model``; publish the names it binds.

    ``namespace`` is where names are read from and published to (a new dict if None; the
    model is bound there as ``model_name``). Nothing is published if the cell fails.
    With ``generate=N``, other keywords go to ``model.generate`` (checked by name first):
    ``do_sample=True, temperature=0.7, top_p=0.9, top_k=50, seed=0, ...``.

    >>> ii.trace(model, "", prompt, generate=8, do_sample=True, seed=0)  # doctest: +SKIP
    """
    model = wrap(model)
    ns = namespace if namespace is not None else {}
    ns.setdefault(model_name, model)
    cell = compile_cell(source, model_expr=model_name, has_input=input is not NO_INPUT,
                        filename=filename, transform_ast=transform_ast)
    return run_compiled(model, cell, ns, input, generate=generate, grad=grad, dry_run=dry_run,
                        ignore_eos=ignore_eos, generate_options=generate_options)


def run_compiled(model: Model, cell: CompiledCell, ns: dict, input: Any, *,
                 generate: int | None, grad: bool, dry_run: bool,
                 ignore_eos: bool = False,
                 generate_options: dict[str, Any] | None = None) -> TraceResult:
    """The pipeline after compiling: validate, run in ``ns`` itself, publish (or undo)."""
    __tracebackhide__ = True
    warn_if_training(model)
    if generate_options and generate is None:
        raise InterventionError(f"{', '.join(sorted(generate_options))}: generate options go "
                                "with --generate N (generate=N)")
    options = check_generate_options(generate_options)
    graph = cell.fresh_graph()
    try:
        with holding(), _UndoOnFailure(ns, bound_names(graph.source, cell.filename),
                                       cell) as undo:
            check_other_models(cell.other_roots, ns, model, cell.model_expr, Model)
            plan = validate(cell, model, graph)
            if dry_run:
                dry = run_dry(model, cell, graph, plan, ns, line_input=input, generate=generate)
                undo.restore()  # a dry run publishes nothing
                return TraceResult(graph, dry_run=True, note=dry.note)
            outcome = run_cell(model, cell, graph, plan, ns, line_input=input,
                               generate=generate, grad=grad, ignore_eos=ignore_eos,
                               options=options)
    except Exception as exc:
        better = explain(exc, grad=grad)
        if better is None:
            raise
        better.at_line(cell_line(exc, cell.filename))
        better.graph = getattr(exc, "graph", None)
        raise better from exc
    return _result(model, outcome, undo.changed(), generate)


class _UndoOnFailure(Bindings):
    """A ``with`` block after which a failed cell's bindings are as before it ran."""

    def __init__(self, ns: dict, names: frozenset[str], cell: CompiledCell) -> None:
        super().__init__(ns, names)
        self.cell = cell

    def __enter__(self) -> "_UndoOnFailure":
        return self

    @uninterruptible
    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.restore()
            _attach_line(exc, self.cell)


def _result(model: Model, outcome: Outcome, names: dict[str, Any],
            generate: int | None) -> TraceResult:
    outcome.graph.published = [n for n in outcome.graph.published if n in names] + [
        n for n in names if n not in outcome.graph.published]
    ids = outcome.batch.kwargs.get("input_ids") if outcome.batch is not None else None
    if ids is not None:
        remember(names, ids)  # views label these tensors' positions with their tokens
    batch = outcome.batch
    tokens = batch is not None and ids is not None
    return TraceResult(outcome.graph, names, outcome.output, outcome.steps, outcome.seconds,
                       prompt_length=batch.length if tokens else None, loss=outcome.loss,
                       input_ids=ids, attention_mask=batch.kwargs.get("attention_mask")
                       if tokens else None, generating=generate is not None,
                       eos=_eos(model) if generate is not None else (), model=model)


def _eos(model: Model) -> tuple[int, ...]:
    """The end-of-text ids generate stops at."""
    config = getattr(model.module, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def _attach_line(exc: BaseException, cell: CompiledCell) -> None:
    line = cell_line(exc, cell.filename)
    if isinstance(exc, InterventionError):
        exc.at_line(line)
        line = exc.line
    if isinstance(exc, Exception):  # the graph with the failing line marked (`--graph`)
        graph = cell.fresh_graph()
        graph.failed_line = line
        try:
            exc.graph = graph
        except AttributeError:  # exceptions with __slots__
            pass
    if not isinstance(exc, InterventionError) and isinstance(exc, Exception) \
            and line is not None:
        exc.add_note(f"ipy_intervene: the cell failed at line {line}; nothing was published, "
                     "no hook is left and the model is unchanged")
