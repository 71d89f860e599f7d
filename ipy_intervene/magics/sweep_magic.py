"""The ``%patch_sweep`` line magic: argument parsing and display only.

Its options, their parsing and its ``%patch_sweep?`` text all come from one table,
``SWEEP_OPTIONS`` (``ipy_intervene/magics/command.py``).
"""

from __future__ import annotations

from typing import Any

from IPython.core.magic import Magics, line_magic, magics_class, no_var_expand
from IPython.display import display

from ipy_intervene.analysis import metrics
from ipy_intervene.magics.command import SWEEP_OPTIONS, SweepCommand, manual
from ipy_intervene.magics.evaluate import evaluate
from ipy_intervene.magics.trace_magic import as_model
from ipy_intervene.magics.tracebacks import shorten, title_of
from ipy_intervene.sweep import SweepResult, patch_sweep
from ipy_intervene.sweep.result import mark_shown

MAGIC = "%patch_sweep"
METRIC_HELPERS = {"logit_diff": metrics.logit_diff, "prob": metrics.prob,
                  "logprob": metrics.logprob}
SUMMARY = """\
Activation patching (exact), attribution patching or causal tracing over a grid.

MODEL and the values of expression options are Python, evaluated in the notebook as if typed
in a cell; logit_diff(correct, wrong), prob(token) and logprob(token) are available where the
notebook does not define those names. The SweepResult is returned (r = %patch_sweep ...),
stored in _sweep (and in --out NAME) and shown once as a heatmap with sliders.

--site also takes the latents of a dictionary spliced with ii.attach: --site sae (the splice
named sae) or --site sae:transformer.h[2] (the one at that module); the grid is latent x
position (--positions [-1]: the latents at one position)."""
EXAMPLES = [
    '%patch_sweep model --clean clean --corrupted corrupt --metric logit_diff("Mary", "John")',
    '%patch_sweep model --clean clean --corrupted corrupt --metric logit_diff("Mary", "John") '
    "--site head_out --out heads",
    "r = %patch_sweep model --clean clean --corrupted corrupt --metric lambda logits: "
    "logits[:, -1, 5] --quiet",
    '%patch_sweep model --clean fact --method noise --subject "Thuzor Quenosk Fountain" '
    "--site mlp_out --window 3",
    '%patch_sweep model --clean clean --corrupted corrupt --metric logit_diff("Mary", "John") '
    "--site sae --positions [-1]",
]


@magics_class
class SweepMagics(Magics):
    @no_var_expand
    @line_magic
    def patch_sweep(self, line: str) -> SweepResult:
        command = SweepCommand.parse(line)
        model = as_model(self._eval(command.model, "MODEL"), command.model, MAGIC)
        values = command.values(self._eval)
        out, quiet = values.pop("out", None), values.pop("quiet", False)
        try:
            result = patch_sweep(model, values.pop("clean"), **values)
        except Exception as exc:
            shorten(exc, None, title_of(self.shell))  # our message, not the engine's frames
            raise
        self.shell.user_ns["_sweep"] = result
        if out is not None:
            self.shell.user_ns[out] = result
        shown = list(result.values()) if isinstance(result, dict) else [result]
        for one in shown:  # several sites: one view each
            if not quiet:
                display(one)
            mark_shown(one)  # so that Out[] does not show it again when this is the last line
        return result

    patch_sweep.__doc__ = manual(MAGIC, SUMMARY, SWEEP_OPTIONS, EXAMPLES)

    def _eval(self, expr: str, role: str) -> Any:
        return evaluate(self.shell, expr, role, MAGIC, METRIC_HELPERS)
