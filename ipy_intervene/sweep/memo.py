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
  the model in eval mode with no hooks, an order-sensitive checksum of the bits of every
  parameter and buffer, the module tree (each module's class and forward), the attention
  implementation, the default dtype and matmul precision, the result's tensors unchanged;
- the proof (:class:`Witness`): one forward of the clean and corrupted prompts in which
  the bits of every module's output are fingerprinted (:func:`fingerprint`), with the
  prompts' token ids and the metric's answer ids. Anything the sweep's
  forwards depend on shows there; a mismatch means the sweep runs again.

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

from ipy_intervene.infra.hooks import HookSession, entry_point, first_tensor

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


# -- the proof ------------------------------------------------------------------------------

@dataclass(eq=False)
class Witness:
    """What one forward of the sweep's prompts computes, kept to compare bit for bit: the
    token ids and mask, the metric's answer ids, and a fingerprint of every module's output
    (each call, in call order: one integer per row and position, see :func:`fingerprint`)."""

    inputs: list[torch.Tensor]
    answers: list[torch.Tensor]
    prints: list[torch.Tensor]

    @classmethod
    def of(cls, model: Any, options: dict[str, Any], metric: Any) -> "Witness | None":
        """The witness of the sweep's clean and corrupted prompts on ``model`` now; None when
        they cannot be prepared (the sweep itself will say what is wrong)."""
        from ipy_intervene.model.loading import wrap

        try:
            model = wrap(model)
            prompts = [options["clean"]] + ([options["corrupted"]]
                                             if options.get("corrupted") is not None else [])
            batches = [model.prepare([p]) for p in prompts]
            n_prompts = batches[0].size
            answers = [metric._ids(model, a, n_prompts) for a in metric.answers]
        except Exception:  # noqa: BLE001 - bad input: the sweep raises its own clear error
            return None
        inputs = [t for b in batches for t in b.kwargs.values() if isinstance(t, torch.Tensor)]
        prints = [p for b in batches for p in _fingerprints(model.module, b.kwargs)]
        return cls(inputs, answers, prints)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Witness) and all(
            len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
            for a, b in ((self.inputs, other.inputs), (self.answers, other.answers),
                         (self.prints, other.prints)))


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and torch.equal(a, b))


@torch.no_grad()
def _fingerprints(module: nn.Module, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """One forward; each module's output tensor, fingerprinted (:func:`fingerprint`): every
    position of every module, and the logits at the last position (all a built-in metric
    reads; the unembedding of the other positions would be most of the cost at a real
    vocabulary)."""
    prints: list[torch.Tensor] = []

    def keep(mod: nn.Module, args: tuple, output: Any) -> None:
        x = first_tensor(output)
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.numel():
            prints.append(fingerprint(x.detach()))

    params = inspect.signature(module.forward).parameters
    if "use_cache" in params:
        kwargs = {**kwargs, "use_cache": False}
    if "logits_to_keep" in params:   # the built-in metrics read the last position's logits;
        kwargs = {**kwargs, "logits_to_keep": 1}   # every earlier output is kept in full
    with HookSession() as session:
        for m in module.modules():
            session.post(m, keep)
        module(**kwargs)
    return prints


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """``x``'s bits along its last dimension, each read as an integer times a fixed odd
    weight of its place, summed with wrap-around: one integer per row. A change of any one
    value always changes its row's number (an odd weight is invertible modulo a power of
    two); several changes almost surely do. Exact whatever order the sum takes.

    >>> x = torch.randn(2, 3, 8)
    >>> torch.equal(fingerprint(x), fingerprint(x.clone()))
    True
    >>> y = x.clone(); y[1, 2, 5] = y[1, 2, 5].nextafter(torch.tensor(9.))
    >>> (fingerprint(x) != fingerprint(y)).sum().item()
    1
    """
    if x.dtype.is_complex:
        x = torch.view_as_real(x).flatten(-2)
    if x.dtype == torch.bool:
        x = x.to(torch.int8)
    ints = x.view(_INT_OF_WIDTH[x.element_size()])
    if ints.element_size() < 4:
        ints = ints.to(torch.int32)
    weights = _place_weights(x.device)[:x.shape[-1]].to(ints.dtype)
    while weights.numel() < x.shape[-1]:       # wider than a chunk: repeat, shifted
        weights = torch.cat([weights, weights[:x.shape[-1] - weights.numel()] + 2])
    return (ints * weights).sum(-1, dtype=ints.dtype)


# -- the cheap checks -----------------------------------------------------------------------

def reusable(module: nn.Module) -> bool:
    """No autograd-free guarantee can cover a hook, a training-mode module or a forward
    replaced on an instance: such a model always runs."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return False
    return not any(m.training or m._forward_hooks or m._forward_pre_hooks
                   or "forward" in m.__dict__ for m in module.modules())


def model_state(module: nn.Module) -> tuple:
    """Storage, shape, dtype, device, version and an order-sensitive checksum of the bits of
    each parameter and buffer; the module tree with each module's class and forward; the
    attention implementation of each config."""
    tensors = [*module.named_parameters(remove_duplicate=False),
               *module.named_buffers(remove_duplicate=False)]
    weights = tuple((name, t.data_ptr(), tuple(t.shape), t.dtype, str(t.device), t._version,
                     checksum(t)) for name, t in tensors)
    tree = tuple((name, type(m), id(m), type(m).forward) for name, m in module.named_modules())
    configs = tuple(sorted({(n, getattr(m.config, "_attn_implementation", None))
                            for n, m in module.named_modules() if hasattr(m, "config")},
                           key=str))
    return weights, tree, configs


def _torch_settings() -> tuple:
    cuda = torch.backends.cuda.matmul
    return (torch.get_default_dtype(), torch.get_float32_matmul_precision(),
            torch.are_deterministic_algorithms_enabled(), cuda.allow_tf32,
            cuda.allow_fp16_reduced_precision_reduction,
            cuda.allow_bf16_reduced_precision_reduction, torch.backends.cudnn.allow_tf32)


_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 20
_WEIGHTS: dict[str, torch.Tensor] = {}


def checksum(t: torch.Tensor) -> int | None:
    """An order-sensitive checksum of a tensor's bits (:func:`fingerprint` of each chunk of
    its values, combined), so a permutation of the values changes it; None where there are
    no bits (meta tensors).

    >>> w = torch.arange(6.)
    >>> checksum(w) == checksum(w.flip(0))
    False
    """
    if t.device.type == "meta" or t.numel() == 0:
        return None
    total = 0
    for chunk in t.detach().reshape(-1).split(_CHUNK):   # detached views: no grad-mode change
        total = (total * 1_000_003 + int(fingerprint(chunk))) % (1 << 61)
    return total


def _place_weights(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _WEIGHTS:
        gen = torch.Generator().manual_seed(27)
        odd = torch.randint(-(1 << 62), 1 << 62, (_CHUNK,), generator=gen, dtype=torch.int64) | 1
        _WEIGHTS[key] = odd.to(device)
    return _WEIGHTS[key]


def same_options(kept: dict[str, Any], now: dict[str, Any]) -> bool:
    """Equal inputs or options: tensors equal in shape, dtype, device and values."""
    if kept.keys() != now.keys():
        return False
    for key, value in now.items():
        old = kept[key]
        if isinstance(value, torch.Tensor) or isinstance(old, torch.Tensor):
            if not (isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor)
                    and _identical(old, value)):
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
    return model_state(module), id(getattr(model, "tokenizer", None)), _torch_settings()


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
