"""``--dry-run``: the cell against a forward on fake tensors (shapes, no numbers), as
nnsight's ``scan`` does.

Every site is reached and every shape is real, so a position past the prompt, a write of
the wrong shape or a site the forward never reaches is the same error, on the same line,
as in a real run; but nothing is computed, nothing is published and hooks you put on the
model yourself are not called. Where the cell branches on a tensor's *value*
(``if h.norm() > 10``) a fake tensor cannot answer: the dry run stops there and says so.

>>> result = run_dry(model, cell, graph, plan, ns, line_input=PROMPT)   # doctest: +SKIP
>>> result.stopped_at, result.note
(None, '')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ipy_intervene.compiler.graph import InterventionGraph
from ipy_intervene.compiler.validate import HookPlan
from ipy_intervene.errors import cell_line
from ipy_intervene.runtime.run import NO_INPUT, run_cell


@dataclass
class DryOutcome:
    graph: InterventionGraph
    stopped_at: int | None = None     # the cell line whose value a fake tensor cannot give
    note: str = ""


def run_dry(model: Any, cell: Any, graph: InterventionGraph, plan: HookPlan, ns: dict, *,
            line_input: Any = NO_INPUT, generate: int | None = None) -> DryOutcome:
    """Run ``cell`` on fake tensors; the caller undoes whatever the cell bound."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        FakeTensorMode,
    )

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            run_cell(model, cell, graph, plan, ns, line_input=line_input, generate=generate,
                     grad=False, fake=True)
    except (DataDependentOutputException, DynamicOutputShapeException) as exc:
        line = cell_line(exc, cell.filename)
        where = f"line {line}" if line is not None else "inside the model (e.g. generate's stop check)"
        return DryOutcome(graph, line, f"the dry run stopped at {where}: it needs a tensor's "
                                       "value, which fake tensors do not have; everything "
                                       "before it was checked")
    return DryOutcome(graph)

