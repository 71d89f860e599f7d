"""Whole sweeps kept across cells: the same sweep again returns the earlier result, but only
once it is *proven* current, not because nothing we thought of has changed.

A user can change what a forward computes in more ways than any list of Python objects can
name (a weight edited through ``.data``, ``ln_f.eps``, a config field, a forward patched on
the class or in the modeling module, the default dtype). So a kept result is reused only
when, on top of cheap checks that turn most changes away at once, a forward run *now*
matches the one recorded when the result was computed, bit for bit:

- cheap checks: the same model object, every option and INPUT equal by value, a built-in
  metric (``ii.logit_diff``/``ii.prob``/``ii.logprob``, compared by its answers; a user's
  callable may read anything, so a sweep with one always runs), no ``cluster``/``dictionary``,
  the model in eval mode with no hooks but its edits' (``ii.edit``: each edit set is keyed
  as another model, and the proof's forward runs the edits), an order-sensitive checksum of
  the bits of every parameter and buffer, the module tree (each module's class and forward), the attention
  implementation, the default dtype and matmul precision, the result's tensors unchanged;
- the proof (``sweep/proof.py``'s ``Witness``): one forward of the clean and corrupted
  prompts in which the bits of every module's output are fingerprinted, with the prompts'
  token ids and the metric's answer ids. Anything the sweep's forwards depend on shows
  there; a mismatch means the sweep runs again.

The proof costs a forward of the clean and corrupted prompts, taken when the sweep has run
(so a sweep pays nothing for it unless it is kept) and again when it is repeated; a sweep
that took less than :data:`MIN_SECONDS` is not kept at all (``benchmarks/repeat_sweep.py``
prints what keeping costs and what a repeat saves). The recorded clean and corrupted runs
a sweep starts from are *not* kept across sweeps: proving one current would cost the
forward it saves.
The reused result says so: ``result.extra["reused"] = True``, in its repr and its view.

>>> fast = memoized(patch_sweep)                  # what sweep/__init__.py exports  # doctest: +SKIP
>>> a = fast(model, clean, corrupt, ii.logit_diff("Mary", "John"))                 # doctest: +SKIP
>>> b = fast(model, clean, corrupt, ii.logit_diff("Mary", "John"))   # one forward # doctest: +SKIP
"""

from __future__ import annotations

import copy
import functools
import inspect
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ipy_intervene.infra.hooks import entry_point
from ipy_intervene.sweep.proof import Witness, identical, model_state, reusable, torch_settings

MAX_ENTRIES = 3    # a result holds its patcher (the view's exact runs): keep only the last few
#: A sweep quicker than this is not kept: its repeat costs less than a second anyway, and the
#: proof (a forward of the clean and corrupted prompts) would be a large share of it.
MIN_SECONDS = 1.0
_entries: list["_Entry"] = []
_counts = {"hits": 0, "misses": 0, "refuted": 0}


@dataclass(eq=False)   # entries are compared by identity (list.remove)
class _Entry:
    module: "weakref.ref[nn.Module]"
    state: tuple
    metric: tuple
    options: dict[str, Any]
    witness: "Witness"
    result: Any
    versions: list[tuple[torch.Tensor, int]]


def memoized(sweep: Callable[..., Any]) -> Callable[..., Any]:
    """``sweep`` (``patch_sweep``'s signature: model, clean, corrupted, metric, options) that
    returns an identical earlier call's result (a copy) once a forward proves it current."""
    signature = inspect.signature(sweep)

    @functools.wraps(sweep)
    @entry_point    # the witness's forward: grad mode back as it was however it ends
    def remembering(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        options = dict(bound.arguments)
        model, metric = options.pop("model"), options.pop("metric")
        module = getattr(model, "module", model)
        key = metric_key(metric)
        if key is None or options.get("cluster") is not None or \
                options.get("dictionary") is not None or not isinstance(module, nn.Module) or \
                not reusable(module):
            return sweep(*args, **kwargs)
        entry = _find(module, key, options, lambda: _state(model, module))
        if entry is not None:
            if Witness.of(model, options, metric) == entry.witness:
                _counts["hits"] += 1
                return _with_model(_copy(entry.result, reused=True), model)
            _counts["refuted"] += 1
            _entries.remove(entry)
        _counts["misses"] += 1
        start = time.perf_counter()
        result = sweep(*args, **kwargs)
        if time.perf_counter() - start >= MIN_SECONDS:   # worth keeping: prove what it ran on
            witness = Witness.of(model, options, metric)
            if witness is not None:
                _keep(module, _state(model, module), key, options, witness, result)
        return _copy(result)

    return remembering


def metric_key(metric: Any) -> tuple | None:
    """A value for the built-in metrics (class and answers); None for anything else."""
    from ipy_intervene.analysis.metrics import LogitDiff, LogProb, Prob

    if type(metric) not in (LogitDiff, Prob, LogProb):
        return None
    answers = []
    for answer in metric.answers:
        if isinstance(answer, (str, int)):
            answers.append(answer)
        elif isinstance(answer, torch.Tensor):
            answers.append(("tensor", tuple(answer.flatten().tolist())))
        elif isinstance(answer, (list, tuple)) and all(isinstance(a, (str, int)) for a in answer):
            answers.append(tuple(answer))
        else:
            return None
    return type(metric).__name__, tuple(answers)


def forget() -> None:
    """Drop every kept result."""
    _entries.clear()
    _counts.update(hits=0, misses=0, refuted=0)


def stats() -> dict[str, int]:
    """Reuses, fresh sweeps and kept results that a forward refuted, since :func:`forget`."""
    return {**_counts, "entries": len(_entries)}


def same_options(kept: dict[str, Any], now: dict[str, Any]) -> bool:
    """Equal inputs or options: tensors equal in shape, dtype, device and values."""
    if kept.keys() != now.keys():
        return False
    for key, value in now.items():
        old = kept[key]
        if isinstance(value, torch.Tensor) or isinstance(old, torch.Tensor):
            if not (isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor)
                    and identical(old, value)):
                return False
        elif not _equal(old, value):
            return False
    return True


def _equal(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - a value without a truth value: not known to be equal
        return False


# -- keeping and finding --------------------------------------------------------------------

def _purge(gone: "weakref.ref[nn.Module]") -> None:
    """A model was garbage-collected: drop what was kept for it at once."""
    _entries[:] = [e for e in _entries if e.module is not gone]


def _state(model: Any, module: nn.Module) -> tuple:
    """The cheap checks' value: the weights, tree and configs, the tokenizer, torch's
    settings."""
    return model_state(module), id(getattr(model, "tokenizer", None)), torch_settings()


def _find(module: nn.Module, key: tuple, options: dict[str, Any],
          state: Callable[[], tuple]) -> Any:
    """The kept entry for this sweep, moved last (the most recent); entries whose model is
    gone, or whose result's tensors were changed in place since, are dropped on the way.
    ``state()`` (a checksum of every weight) is computed only when an entry could match."""
    current = functools.cache(state)   # once, and only if an entry could match
    for entry in list(_entries):
        if entry.module() is None:
            _entries.remove(entry)
        elif (entry.module() is module and entry.metric == key
              and same_options(entry.options, options)
              and entry.state == current()):
            _entries.remove(entry)
            if all(t._version == v for t, v in entry.versions):
                _entries.append(entry)
                return entry
    return None


def _keep(module: nn.Module, state: tuple, key: tuple, options: dict[str, Any],
          witness: Witness, result: Any) -> None:
    try:
        kept = {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                for k, v in options.items()}
    except Exception:  # noqa: BLE001 - an option that cannot be copied: not kept
        return
    tensors = [t for r in _results(result) for t in (r.values, r.raw, r.prompt_values)
               if isinstance(t, torch.Tensor)]
    _entries.append(_Entry(weakref.ref(module, _purge), state, key, kept, witness,
                           _without_model(result), [(t, t._version) for t in tensors]))
    while len(_entries) > MAX_ENTRIES:
        _entries.pop(0)


def _without_model(result: Any) -> Any:
    """A copy to keep that does not keep the model alive: its patcher (the view's exact
    per-cell runs) without the model and its engine; rebuilt on reuse by
    :func:`_with_model` (a patcher that cannot be rebuilt is dropped)."""
    if isinstance(result, dict):
        return {k: _without_model(v) for k, v in result.items()}
    out = copy.copy(result)
    patcher = getattr(result, "patcher", None)
    if patcher is not None:
        rebuildable = hasattr(patcher, "memory_fraction")  # api.Patcher builds its engine
        out.patcher = copy.copy(patcher) if rebuildable else None
        if rebuildable:
            out.patcher.model, out.patcher._engine = None, None
    return out


def _with_model(result: Any, model: Any) -> Any:
    if isinstance(result, dict):
        return {k: _with_model(v, model) for k, v in result.items()}
    if getattr(result, "patcher", None) is not None:
        from ipy_intervene.model.loading import wrap

        result.patcher = copy.copy(result.patcher)
        result.patcher.model = wrap(model)
    return result


def _results(result: Any) -> list[Any]:
    return list(result.values()) if isinstance(result, dict) else [result]


def _copy(result: Any, reused: bool = False) -> Any:
    """A copy (its own ``extra``, marked ``reused`` when it is, and its own values) of a
    result or a dict of results."""
    if isinstance(result, dict):
        return {k: _copy(v, reused) for k, v in result.items()}
    out = copy.copy(result)
    extra = getattr(result, "extra", None)
    if isinstance(extra, dict):
        out.extra = {**extra, **({"reused": True} if reused else {})}
    for name in ("values", "raw", "prompt_values"):  # each result has tensors of its own
        value = getattr(result, name, None)
        if isinstance(value, torch.Tensor):
            setattr(out, name, value.clone())
    return out
