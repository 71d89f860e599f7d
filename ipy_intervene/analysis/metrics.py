"""Sweep metrics: functions from logits to one number per prompt.

Built-ins read the last position only, so sweeps compute the unembedding there alone::

    ii.patch_sweep(model, clean, corrupted, ii.logit_diff("Mary", "John"))
    ii.patch_sweep(model, clean, corrupted, ii.prob(["Mary", "John"]))   # one answer per prompt

Any callable ``f(logits) -> Tensor[batch]`` works too, as fast: sweeps find the positions it
reads from the clean run (its gradient, checked by poisoning the other positions; see
``ipy_intervene/sweep/reads.py``) and compute logits only there. ``@ii.metric(positions=[-1])``
declares them instead (the metric then receives only those positions), and
``@ii.metric(positions="all")`` gives it every position without looking.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ipy_intervene.errors import InputError

Answer = str | int | Sequence[str | int]
Bound = Callable[[torch.Tensor], torch.Tensor]


class Metric:
    """A metric and the logit positions it reads (``None``: all of them).

    ``bind(model, n_prompts)`` gives the function the sweep calls on logits whose rows are
    the prompts tiled any number of times (row ``r`` is prompt ``r % n_prompts``).
    """

    positions: tuple[int, ...] | None = (-1,)
    detect = False      # True: the positions are found from the clean logits (a plain callable)
    name = "metric"
    batch_mean = False  # set once the metric returned one number for a batch of prompts

    def no_per_prompt(self) -> dict[str, str]:
        """What a result says when per-prompt values do not exist (see ``batch_mean``)."""
        if not self.batch_mean:
            return {}
        return {"no_per_prompt": (
            f"metric `{self.name}` returned one number for the whole batch of prompts, so "
            "per-prompt values do not exist (`values` and `raw` use the batch's number). "
            "Return one value per prompt (for example, drop a final `.mean()`) to get them")}

    def bind(self, model: Any, n_prompts: int) -> Bound:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class _AnswerMetric(Metric):
    def __init__(self, *answers: Answer) -> None:
        self.answers = answers

    def _ids(self, model: Any, answer: Answer, n_prompts: int) -> torch.Tensor:
        items = [answer] if isinstance(answer, (str, int)) else list(answer)
        if len(items) not in (1, n_prompts):
            raise InputError(f"{self.name}: {len(items)} answers for {n_prompts} prompts; give "
                             "one answer, or one per prompt")
        ids = [item if isinstance(item, int) else model.token_id(item) for item in items]
        return torch.tensor(ids * (n_prompts // len(ids)), device=model.device)


class LogitDiff(_AnswerMetric):
    name = "logit_diff"

    def bind(self, model: Any, n_prompts: int) -> Bound:
        good, bad = (self._ids(model, a, n_prompts) for a in self.answers)

        def logit_diff(logits: torch.Tensor) -> torch.Tensor:
            last, good_, bad_ = _tile(logits[:, -1].float(), good, bad)  # in float32
            return (last.gather(-1, good_[:, None]) - last.gather(-1, bad_[:, None]))[:, 0]

        return logit_diff


class Prob(_AnswerMetric):
    name = "prob"
    log = False

    def bind(self, model: Any, n_prompts: int) -> Bound:
        (target,) = (self._ids(model, a, n_prompts) for a in self.answers)
        log = self.log

        def prob(logits: torch.Tensor) -> torch.Tensor:
            last, target_ = _tile(logits[:, -1], target)
            logp = torch.log_softmax(last.float(), -1).gather(-1, target_[:, None])[:, 0]
            return logp if log else logp.exp()

        return prob


class LogProb(Prob):
    name = "logprob"
    log = True


class Custom(Metric):
    """A user's callable, called on one block of prompts at a time (its own batch).

    ``positions``: the logit positions it reads (it then receives only those), ``"all"``, or
    ``"auto"``/None (found by each sweep from the clean logits).
    """

    def __init__(self, fn: Callable[[torch.Tensor], Any],
                 positions: Sequence[int] | str | None = "auto") -> None:
        self.fn = fn
        if isinstance(positions, str) and positions not in ("auto", "all"):
            raise InputError(f"positions={positions!r}: give a list of logit positions, "
                             "'all' or 'auto'")
        self.detect = positions is None or positions == "auto"
        self.positions = None if isinstance(positions, str) or positions is None else tuple(
            int(p) for p in positions)
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def bind(self, model: Any, n_prompts: int) -> Bound:
        fn, name = self.fn, self.name
        self.batch_mean = False  # found again by each sweep: it depends on n_prompts

        def custom(logits: torch.Tensor) -> torch.Tensor:
            blocks = [self._one_per_prompt(fn(block), name, n_prompts)
                      for block in logits.split(n_prompts)]
            return torch.cat(blocks)

        return custom

    def _one_per_prompt(self, value: Any, name: str, n_prompts: int) -> torch.Tensor:
        if n_prompts > 1 and torch.as_tensor(value).dim() == 0:
            self.batch_mean = True
        return _per_prompt(value, name, n_prompts)


def _per_prompt(value: Any, name: str, n_prompts: int) -> torch.Tensor:
    value = torch.as_tensor(value)
    if value.dim() == 0:  # one number for the batch: the same for every prompt
        value = value.expand(n_prompts)
    if value.shape != (n_prompts,):
        raise InputError(f"metric `{name}` returned shape {list(value.shape)}; expected one "
                         f"number per prompt, shape [{n_prompts}] (or a scalar)")
    return value.float()


def _tile(last: torch.Tensor, *ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    reps = last.shape[0] // ids[0].shape[0]
    return (last, *(i.repeat(reps) for i in ids))


def logit_diff(correct: Answer, wrong: Answer) -> Metric:
    """Logit of ``correct`` minus logit of ``wrong`` at the last position (per prompt answers
    allowed): ``logit_diff("Mary", "John")`` or ``logit_diff(["Mary", "Tom"], ["John", "Ann"])``.
    """
    return LogitDiff(correct, wrong)


def prob(token: Answer) -> Metric:
    """Probability of ``token`` at the last position: ``prob("Paris")``."""
    return Prob(token)


def logprob(token: Answer) -> Metric:
    """Log-probability of ``token`` at the last position: ``logprob("Paris")``."""
    return LogProb(token)


def metric(fn: Callable | None = None, *,
           positions: Sequence[int] | str | None = "auto") -> Any:
    """Make a callable a metric; ``positions`` says which logit positions it reads (default:
    found by each sweep; ``"all"``: every position, without looking).

    >>> @metric(positions=[-1])
    ... def top_logit(logits):
    ...     return logits[:, -1].max(-1).values
    """
    if fn is None:
        return lambda f: Custom(f, positions)
    return Custom(fn, positions)


def as_metric(value: Any) -> Metric:
    """A Metric from a Metric or a plain callable; a clear error otherwise."""
    if isinstance(value, Metric):
        return value
    if callable(value):
        return Custom(value)
    raise InputError(f"metric must be ii.logit_diff(...), ii.prob(...), ii.logprob(...) or a "
                     f"callable from logits to one number per prompt; got {type(value).__name__}")
