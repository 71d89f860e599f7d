"""Which logit positions a metric reads, found once from the clean run's logits.

Unembedding every position of every patched run costs a third of a GPT-2-small forward, so
sweeps compute logits only where the metric reads them. Built-in metrics and
``@ii.metric(positions=...)`` say where; for a plain callable the positions are found, not
trusted: on the clean logits ``[prompts, P, vocab]``

1. the positions with a nonzero gradient of the metric (autograd on the logits only), and
2. the metric with every other position poisoned (NaN, then large random values) must give
   exactly the same finite numbers.

Only when both agree does a sweep narrow; then the metric is called either on the logits of
those positions alone ``[rows, k, vocab]`` (when that gives exactly the same numbers, as for
``logits[:, -1]``) or on all ``P`` positions with NaN where it does not read (``spread``: a
metric that then reads elsewhere gives NaN, not a wrong number). Anything else -- no
gradient, a mean over positions, an index that depends on the data -- gets every position.

>>> reads = find_reads(as_metric(lambda l: l[:, -1, 3] - l[:, -1, 5]), bound, clean_logits)
>>> reads.positions, reads.spread, reads.how                        # doctest: +SKIP
((14,), False, 'found')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ipy_intervene.analysis.metrics import Metric

Bound = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Reads:
    """The logit positions a metric reads (non-negative, sorted) and how it gets them."""

    positions: tuple[int, ...]
    length: int
    spread: bool = False       # called on all positions, NaN where it does not read
    how: str = "declared"      # declared | found | all (and why)

    @property
    def every(self) -> bool:
        return len(self.positions) == self.length

    def feed(self, bound: Bound) -> Bound:
        """``bound`` taking the logits at ``positions`` (``[rows, k, vocab]``)."""
        if not self.spread:
            return bound
        length, where = self.length, list(self.positions)

        def spread(logits: torch.Tensor) -> torch.Tensor:
            full = logits.new_full((logits.shape[0], length, logits.shape[-1]), math.nan)
            full[:, where] = logits
            return bound(full)

        return spread

    def describe(self) -> str:
        """For a result's ``extra``: ``"found: [14]"``, ``"all (no gradient)"``."""
        if self.every and self.how != "declared":
            return self.how
        return f"{self.how}: {list(self.positions)}" + (" (spread)" if self.spread else "")


def every_position(length: int, why: str = "") -> Reads:
    return Reads(tuple(range(length)), length, how=f"all ({why})" if why else "all")


def declared_reads(metric: Metric, length: int) -> Reads | None:
    """The positions a metric declares; None when it must be found (a plain callable)."""
    if getattr(metric, "detect", False):
        return None
    if metric.positions is None:
        return every_position(length, "declared")
    return Reads(tuple(sorted({p % length for p in metric.positions})), length)


def find_reads(metric: Metric, bound: Bound, logits: torch.Tensor) -> Reads:
    """The positions ``bound`` reads, from the clean logits ``[prompts, P, vocab]`` (see the
    module's docstring). The metric's own errors propagate, as the sweep would raise them."""
    length = int(logits.shape[1])
    declared = declared_reads(metric, length)
    if declared is not None:
        return declared
    logits = logits.detach()
    full = _call(bound, logits)
    if not bool(torch.isfinite(full).all()):
        return every_position(length, "the clean metric is not finite")
    read = _gradient_positions(bound, logits)
    if read is None:
        return every_position(length, "no gradient to find them with")
    if not read or len(read) == length:
        return every_position(length, "reads every position" if read else "no position "
                              "has a gradient")
    for poison in (_nan, _noise):
        try:
            same = _same(_call(bound, poison(logits, read)), full)
        except Exception:  # noqa: BLE001 - a metric that breaks on other values reads them
            same = False
        if not same:
            return every_position(length, "the metric reads positions without a gradient")
    return Reads(tuple(read), length, spread=not _narrow_ok(bound, logits, read, full),
                 how="found")


def _call(bound: Bound, logits: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return bound(logits.clone()).detach()


def _gradient_positions(bound: Bound, logits: torch.Tensor) -> list[int] | None:
    """Positions where some row and token has a nonzero gradient; None without a gradient."""
    leaf = logits.clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = bound(leaf)
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                return None
            (grad,) = torch.autograd.grad(out.float().sum(), leaf, allow_unused=True)
    except Exception:  # noqa: BLE001 - a metric autograd cannot follow: read everything
        return None
    if grad is None:
        return None
    return (grad != 0).any(-1).any(0).nonzero().flatten().tolist()


def _nan(logits: torch.Tensor, read: list[int]) -> torch.Tensor:
    out = torch.full_like(logits, math.nan)
    out[:, read] = logits[:, read]
    return out


def _noise(logits: torch.Tensor, read: list[int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    big = float(logits.float().abs().max()) * 1e4 + 1e4
    scale = min(big, torch.finfo(logits.dtype).max / 1e3)  # large, and finite in float16
    out = (torch.randn(logits.shape, generator=gen) * scale).to(logits.device, logits.dtype)
    out[:, read] = logits[:, read]
    return out


def _narrow_ok(bound: Bound, logits: torch.Tensor, read: list[int],
               full: torch.Tensor) -> bool:
    """True when the metric gives the same numbers on the read positions alone."""
    try:
        return _same(_call(bound, logits[:, read]), full)
    except Exception:  # noqa: BLE001 - e.g. an IndexError for logits[:, 14]: spread instead
        return False


def _same(got: Any, want: torch.Tensor) -> bool:
    got = torch.as_tensor(got)
    return (got.shape == want.shape and got.dtype == want.dtype
            and bool(torch.isfinite(got).all()) and torch.equal(got, want))


class OnLogits:
    """A metric on a model's own output logits (head sweeps, path patching), with the
    forward's unembedding cut to the positions from the first one the metric reads on.

    >>> metric = OnLogits(model, as_metric(fn), n_prompts=8, length=15)  # doctest: +SKIP
    >>> clean = model.module(**clean_kwargs).logits   # every position: finds the reads
    >>> metric.settle(clean)
    >>> metric(model.module(**kwargs, **metric.keep).logits)             # doctest: +SKIP
    """

    def __init__(self, model: Any, metric: Metric, n_prompts: int, length: int) -> None:
        self.metric, self.length = metric, length
        self.bound = metric.bind(model, n_prompts)
        self.reads = declared_reads(metric, length)
        self.takes_keep = "logits_to_keep" in getattr(model, "_forward_params", ())

    @property
    def keep(self) -> dict[str, int]:
        """``logits_to_keep`` for the forward (nothing before ``settle`` found the reads)."""
        if self.reads is None or self.reads.every or not self.takes_keep:
            return {}
        return {"logits_to_keep": self.length - self.reads.positions[0]}

    def settle(self, clean_logits: torch.Tensor) -> None:
        """Find the positions from the clean run's logits at every position."""
        if self.reads is None:
            self.reads = find_reads(self.metric, self.bound, clean_logits)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric of each row, from logits of the last ``logits.shape[1]`` positions."""
        offset = self.length - logits.shape[1]
        index = [p - offset for p in self.reads.positions]
        if index != list(range(logits.shape[1])):
            logits = logits[:, index]
        return self.reads.feed(self.bound)(logits)
