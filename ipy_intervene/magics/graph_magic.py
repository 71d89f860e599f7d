"""The ``%attribution_graph`` line magic: one prompt's attribution graph through transcoders,
shown as the graph view and bound to ``_graph`` (and ``--out NAME``). Parsing and display
only: the work is :func:`ipy_intervene.attribution_graph`.

>>> GraphCommand.parse('model "Mary gave a drink to" --transcoders demo --out g')
GraphCommand(model='model', prompt='"Mary gave a drink to"', options={'transcoders': 'demo', 'out': 'g'})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class, no_var_expand
from IPython.display import display

from ipy_intervene.magics.command import (EXPRESSION, FLAG, NAME, Option, SweepCommand, manual,
                                          split_expressions, split_options)
from ipy_intervene.magics.evaluate import evaluate
from ipy_intervene.magics.sweep_magic import METRIC_HELPERS
from ipy_intervene.magics.trace_magic import as_model
from ipy_intervene.magics.tracebacks import shorten, title_of

MAGIC = "%attribution_graph"
GRAPH_OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("transcoders", EXPRESSION, "T", "one transcoder per MLP: demo (the demo model's), a "
           "folder path, a dict {layer: ii.SAE} or a list", required=True),
    Option("target", EXPRESSION, "Y", "the output node(s): logit_diff(correct, wrong), a "
           "token or a list of tokens", "the logits covering --logit-share"),
    Option("logit_share", EXPRESSION, "P", "with no --target: the share of the next-token "
           "probability the output logits cover", "0.95"),
    Option("max_logits", EXPRESSION, "N", "with no --target: at most this many output logits",
           "10"),
    Option("max_feature_nodes", EXPRESSION, "N", "expand only the N features most "
           "influential on the target", "all"),
    Option("batch_size", EXPRESSION, "N", "adjacency rows per backward pass", "32"),
    Option("node_threshold", EXPRESSION, "S", "the view keeps the features carrying this "
           "share of the influence", "0.8"),
    Option("edge_threshold", EXPRESSION, "S", "and the edges carrying this share", "0.98"),
    Option("examples", EXPRESSION, "PROMPTS", "prompts whose top activating tokens each "
           "feature's hover text shows"),
    Option("groups", EXPRESSION, "D", "supernodes by hand: {name: [node ids]}"),
    Option("max_edges", EXPRESSION, "N", "draw at most the N strongest edges", "600"),
    Option("out", NAME, "NAME", "also store the AttributionGraph in NAME (it is always in "
           "_graph)"),
    Option("quiet", FLAG, help="show nothing (the graph is still returned and stored)"),
)}
VIEW = ("node_threshold", "edge_threshold", "examples", "groups", "max_edges")
SUMMARY = """\
The attribution graph of one PROMPT (Ameisen et al. 2025): each MLP replaced by its
transcoder, attention patterns and norm scales frozen on the prompt, and every active
feature, error node and token joined to every later feature and the output logits by its
exact direct effect. The AttributionGraph is returned (g = %attribution_graph ...), stored
in _graph (and in --out NAME) and shown once, pruned, as the graph view; g.intervene(...)
and, in a %%trace cell, g.apply(model, ...) edit its nodes.

MODEL, PROMPT and the values of expression options are Python, evaluated in the notebook;
logit_diff(correct, wrong) is available, and --transcoders demo means the demo's own."""
EXAMPLES = [
    '%attribution_graph model "When Mary and John went to the store , John gave a drink to" '
    '--transcoders demo --target logit_diff("Mary", "John")',
    'g = %attribution_graph model prompt --transcoders "/data/transcoders" --max-feature-nodes '
    '500 --quiet',
]


class _Options(SweepCommand):
    @staticmethod
    def table() -> dict[str, Option]:
        return GRAPH_OPTIONS


@dataclass(frozen=True)
class GraphCommand:
    """``%attribution_graph MODEL PROMPT --transcoders T [--option VALUE ...]``, checked
    against ``GRAPH_OPTIONS`` before anything is evaluated."""

    model: str
    prompt: str
    options: dict[str, str]

    @classmethod
    def parse(cls, line: str, magic: str = MAGIC) -> "GraphCommand":
        head, rest = split_options(line)
        if not head.strip():
            raise UsageError(f"{magic} needs a MODEL and a PROMPT: {magic} model \"a prompt\" "
                             "--transcoders demo")
        model, prompt = split_expressions(head, magic)
        if prompt is None:
            raise UsageError(f"{magic} needs a PROMPT after MODEL: {magic} {model} \"a "
                             "prompt\" --transcoders demo")
        options = _Options.parse(f"{model} {rest}", magic).options
        return cls(model, prompt, options)

    def values(self, evaluate: Callable[[str, str], Any]) -> dict[str, Any]:
        return _Options(self.model, self.options).values(evaluate)


@magics_class
class GraphMagics(Magics):
    @no_var_expand
    @line_magic
    def attribution_graph(self, line: str) -> Any:
        from ipy_intervene.circuit.attribution_graph import attribution_graph
        from ipy_intervene.circuit.graph_examples import top_activations

        command = GraphCommand.parse(line)
        model = as_model(self._eval(command.model, "MODEL"), command.model, MAGIC)
        prompt = self._eval(command.prompt, "PROMPT")
        values = command.values(self._eval)
        out, quiet = values.pop("out", None), values.pop("quiet", False)
        view = {name: values.pop(name) for name in VIEW if name in values}
        try:
            graph = attribution_graph(model, prompt, values.pop("transcoders"), **values)
            if not quiet:
                examples = view.pop("examples", None)
                if examples is not None:
                    view["top_tokens"] = top_activations(graph, examples, k=5)
                display(graph.show(**view))
        except Exception as exc:
            shorten(exc, None, title_of(self.shell))
            raise
        graph.mark_shown()  # returned to Out[] as the last line: not shown twice
        self.shell.user_ns["_graph"] = graph
        if out is not None:
            self.shell.user_ns[out] = graph
        return graph

    attribution_graph.__doc__ = manual(MAGIC, SUMMARY, GRAPH_OPTIONS, EXAMPLES).replace(
        f"{MAGIC} MODEL", f"{MAGIC} MODEL PROMPT", 1)

    def _eval(self, expr: str, role: str) -> Any:
        return evaluate(self.shell, expr, role, MAGIC, {**METRIC_HELPERS, "demo": "demo"})
