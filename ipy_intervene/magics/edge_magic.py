"""The ``%edge_attribution`` line magic: EAP / EAP-IG edge scores in one line, shown as the
circuit view of the top edges. Options come from ``EDGE_OPTIONS`` (``magics/command.py``),
parsed like ``%patch_sweep``'s."""

from __future__ import annotations

from typing import Any

from IPython.core.magic import Magics, line_magic, magics_class, no_var_expand

from ipy_intervene.magics.command import EDGE_OPTIONS, EdgeCommand, manual
from ipy_intervene.magics.evaluate import evaluate
from ipy_intervene.magics.sweep_magic import METRIC_HELPERS
from ipy_intervene.magics.trace_magic import as_model
from ipy_intervene.magics.tracebacks import shorten, title_of

MAGIC = "%edge_attribution"
SUMMARY = """\
Edge attribution (EAP, or EAP-IG with --method eap-ig) over the component graph: a score for
every edge between the embeddings, each head's output and q/k/v inputs, each MLP and the
logits. The EdgeResult is returned (e = %edge_attribution ...; as a cell's last line it is
shown as the circuit of its top 30 edges) and stored in _edges (and in --out NAME);
e.circuit(top=k).verify() runs a circuit exactly."""
EXAMPLES = [
    '%edge_attribution model --clean clean --corrupted corrupt --metric logit_diff("Mary", '
    '"John")',
    'e = %edge_attribution model --clean clean --corrupted corrupt --metric logit_diff("Mary", '
    '"John") --method eap-ig --steps 5',
]


@magics_class
class EdgeMagics(Magics):
    @no_var_expand
    @line_magic
    def edge_attribution(self, line: str) -> Any:
        from ipy_intervene.circuit import edge_attribution

        command = EdgeCommand.parse(line, MAGIC)
        model = as_model(self._eval(command.model, "MODEL"), command.model, MAGIC)
        values = command.values(self._eval)
        out = values.pop("out", None)
        try:
            result = edge_attribution(model, values.pop("clean"), values.pop("corrupted"),
                                      values.pop("metric"), **values)
        except Exception as exc:
            shorten(exc, None, title_of(self.shell))
            raise
        self.shell.user_ns["_edges"] = result
        if out is not None:
            self.shell.user_ns[out] = result
        return result  # shown by IPython as the circuit view when it is the last line

    edge_attribution.__doc__ = manual(MAGIC, SUMMARY, EDGE_OPTIONS, EXAMPLES)

    def _eval(self, expr: str, role: str) -> Any:
        return evaluate(self.shell, expr, role, MAGIC, METRIC_HELPERS)
