"""One run of an edit's cell: a trace's run (:class:`~ipy_intervene.runtime.run.TraceRun`)
that a forward someone else started drives, instead of one the trace starts itself.

A forward of the whole model (``model(...)``, ``generate``, a pipeline, a sweep's recording,
``ii.cache``) is one run, with one invoke per row of its batch, so that each prompt sees
its own positions (left padding cut, ``[:, -1]`` its last token, as in
:mod:`ipy_intervene.runtime.values`); the steps of a generation continue that run, as in
``--generate`` (code outside ``for step in tracer.steps():`` applies at the prompt's
forward, the loop's body at every step). A call of the edited module alone (ad hoc,
from a cell) is a run of its own over the rows and positions that call gets.

>>> run = EditRun(edit, batch_of((ids,), {"attention_mask": mask}))      # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from ipy_intervene.errors import InputError, InterventionError
from ipy_intervene.infra import active
from ipy_intervene.model.batch import Batch
from ipy_intervene.runtime import facade
from ipy_intervene.runtime.run import TraceRun
from ipy_intervene.runtime.scheduler import Request

REASON = ("an edit applies at every later forward of the edited model, each prompt on its "
          "own")


class _Hooks:
    """What a run's TraceHooks ask of a hook session: here, the edit's lasting hooks (a site
    the compiler could not see gets one when it is first asked for)."""

    def __init__(self, add: Callable[[Any, str], None]) -> None:
        self.add = add

    def pre(self, module: Any, fn: Any) -> None:
        self.add(module, "pre")

    def post(self, module: Any, fn: Any) -> None:
        self.add(module, "out")

    def replace_forward(self, module: Any, make: Any) -> None:
        raise InterventionError("`.skip(value)` does not go in an edit: assign the module's "
                                "output instead (`m.output = value`)")


class EditRun(TraceRun):
    """The edit's cell run against one forward (and its generation steps), or one call."""

    def __init__(self, edit: Any, batch: Batch, call: bool = False) -> None:
        super().__init__(edit.model, edit.cell, edit.graph, edit.ns, None,
                         _Hooks(edit.hooks.add))
        self.edit, self.batch, self.call = edit, batch, call
        self.sites = len(edit.graph.sites)

    def start(self) -> None:
        """One invoke per row (one for a call), each with a namespace of its own, run to its
        first request; then the first step begins."""
        code = self.cell.invokes[0].body
        rows = len(self.batch.rows)
        bodies = [(0, _body(code, dict(self.ns))) for _ in range(rows)]
        facade.install()
        with active.tracing(self):   # the invokes' greenlets see this run
            self.sched.start(bodies, self.batch)
        self.sched.new_step()

    def end(self) -> None:
        """End the invokes' greenlets; forget what the run added to the edit's graph."""
        self.sched.kill()
        graph = self.edit.graph
        del graph.sites[self.sites:]
        for site in graph.sites:
            site.visits.clear()

    def pending_sites(self) -> list[Request]:
        """Requests for a site of this step (or an earlier one) still waiting: the forward
        is over, so they were never reached."""
        sched = self.sched
        return [inv.pending for inv in sched.invokes if inv.pending is not None
                and inv.pending.kind == "site" and inv.pending.step <= sched.step]

    def busy(self) -> bool:
        return any(inv.pending is not None for inv in self.sched.invokes)

    # -- what a trace has and an edit does not ------------------------------------------------

    def steps(self, n: int | None) -> Iterator[int]:
        """Every step of a generation (up to ``n``): the loop waits for the next step and
        ends with the generation (a forward that is not a generation has step 0 alone)."""
        sched = self.sched
        inv = sched.current(what="tracer.steps()")
        step = 0
        while n is None or step < n:
            if step > max(sched.step, 0) and not sched.wait(Request("step", step=step)):
                return
            inv.step = step
            yield step
            step += 1

    def stop(self, line: int | None) -> None:
        raise InterventionError(f"tracer.stop() does not go in an edit: {REASON}, to its end",
                                line=line)

    def model_output(self, sid: int | None) -> Any:
        raise InterventionError(f"tracer.output does not go in an edit: {REASON}; read "
                                "`model.lm_head.output` (the logits) in the edit instead")

    def add_invoke(self, code: int, input_: Any, names: dict[str, Any]) -> None:
        raise InterventionError(f"tracer.invoke does not go in an edit: {REASON}")


def _body(code: Any, ns: dict) -> Callable[[], None]:
    return lambda: exec(code, ns)


def cache_length(kwargs: dict[str, Any]) -> int:
    """Positions already in the key/value cache a forward was given (0: none, a new text)."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def tokens_of(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The forward's token ids (or input embeddings): ``[batch, positions, ...]``."""
    for value in (kwargs.get("input_ids"), args[0] if args else None,
                  kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value
    return None


def batch_of(args: tuple, kwargs: dict[str, Any], name: str) -> Batch:
    """The batch a forward of the whole model runs: one row per prompt, each row's own
    length from its attention mask (left padding; any other padding is refused: each
    prompt's positions would not be known)."""
    tokens = tokens_of(args, kwargs)
    if tokens is None:
        raise InputError(f"the edit `{name}` needs the forward's token ids (input_ids, or "
                         "inputs_embeds) to know each prompt's positions")
    rows, length = int(tokens.shape[0]), int(tokens.shape[1])
    widths = _widths(kwargs.get("attention_mask"), rows, length, name)
    placeholder = torch.empty(rows, length, device="meta")
    return Batch({"input_ids": placeholder}, [slice(i, i + 1) for i in range(rows)],
                 widths=widths)


def _widths(mask: Any, rows: int, length: int, name: str) -> list[int]:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape != (rows, length):
        return [length] * rows
    ones = mask.to(torch.bool)
    widths = ones.sum(1)
    expected = torch.arange(length, device=ones.device).unsqueeze(0) >= (length - widths
                                                                         ).unsqueeze(1)
    if not torch.equal(ones, expected):
        row = int((ones != expected).any(1).nonzero()[0])
        shown = mask[row].tolist() if length <= 32 else f"{int(widths[row])} ones in {length}"
        raise InputError(
            f"the edit `{name}` sees each prompt at its own positions ([:, -1] its last "
            f"token), counted from where its tokens start; a batch must be padded on the "
            f"left for that, and row {row} of this forward's attention mask is {shown}, "
            "not left padding. Pad on the left: tokenizer.padding_side = 'left' before "
            "tokenizer(prompts, padding=True, return_tensors='pt'), or model.prepare(prompts)"
            ".kwargs (ipy_intervene pads on the left; read each prompt's last logits at "
            "[:, -1]); or give the prompts one at a time")
    return [int(w) for w in widths]


def call_batch(value: Any) -> Batch:
    """The batch of one call of a module outside a forward of the whole model: all its rows
    as one invoke, its positions as the call has them."""
    rows = _rows(value)
    return Batch({}, [slice(0, rows)], args=(torch.empty(rows, device="meta"),))


def _rows(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() else 1
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, (torch.Tensor, tuple, list, dict)):
                return _rows(item)
    if isinstance(value, dict):
        return _rows(list(value.values()))
    return 1
