"""Recorded runs kept across cells: a second sweep on the same model, inputs and weights takes
the clean and corrupted recordings of the first instead of running them again.

A recording is reused only when everything it depends on is as it was:

- the model object, every parameter and buffer (its storage, shape, dtype, device and
  ``_version``, which any in-place change bumps: an optimizer step, ``load_state_dict``,
  ``p.data = ...``, ``p.add_(...)`` under ``no_grad``), the attention implementation;
- the inputs (token ids, mask, positions: compared by value) and what was asked
  (site kind, layers, logit positions, stream);
- the recorded tensors themselves (their ``_version``: a caller that changed one in place
  makes the entry stale).

Never reused: runs with autograd on, with noise, with a module in training mode, or while any
hook is on the model (the caller's hooks must see the forward, and a user's hook may change
it). Only the last :data:`MAX_ENTRIES` recordings, at most :data:`MAX_BYTES` together, are
kept; :func:`forget` drops them all.

>>> from ipy_intervene.sweep import clean_runs
>>> clean_runs.forget()          # e.g. before timing a sweep from scratch
>>> clean_runs.stats()
{'hits': 0, 'misses': 0, 'entries': 0, 'bytes': 0}
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

MAX_ENTRIES = 4
MAX_BYTES = 1 << 30

_entries: list["_Entry"] = []
_counts = {"hits": 0, "misses": 0}


@dataclass(eq=False)   # entries are compared by identity (list.remove)
class _Entry:
    module: "weakref.ref[nn.Module]"
    state: tuple
    ask: tuple
    kwargs: dict[str, Any]
    recording: Any
    versions: list[tuple[torch.Tensor, int]]
    nbytes: int


def reuse(module: nn.Module, kwargs: dict[str, Any], ask: tuple,
          run: Callable[[], Any], copy: Callable[[Any], Any],
          tensors: Callable[[Any], list[torch.Tensor]]) -> Any:
    """A copy of the kept recording of ``module`` on ``kwargs`` for ``ask``, or ``run()``
    (kept for next time when it may be reused). ``copy`` gives a recording with fresh
    containers around the same tensors; ``tensors`` lists its tensors."""
    if not _reusable(module):
        return run()
    state = _state(module)
    entry = find(_entries, lambda e: e.module() is module and e.ask == ask and
                 e.state == state and same_inputs(e.kwargs, kwargs))
    if entry is not None:
        _counts["hits"] += 1
        return copy(entry.recording)
    _counts["misses"] += 1
    recording = run()
    _keep(module, state, ask, kwargs, recording, tensors(recording))
    return copy(recording)


def _purge(gone: "weakref.ref[nn.Module]") -> None:
    """A model was garbage-collected: drop its recordings at once (they may hold GPU memory)."""
    _entries[:] = [e for e in _entries if e.module is not gone]


def find(entries: list, matches: Callable[[Any], bool]) -> Any:
    """The kept entry that ``matches``, moved last (the most recent); entries whose module
    is gone, or whose tensors were changed in place since, are dropped on the way."""
    for entry in list(entries):
        if entry.module() is None:
            entries.remove(entry)
        elif matches(entry):
            entries.remove(entry)
            if all(t._version == v for t, v in entry.versions):
                entries.append(entry)
                return entry
    return None


def forget() -> None:
    """Drop every kept recording."""
    _entries.clear()
    _counts.update(hits=0, misses=0)


def stats() -> dict[str, int]:
    """Reuses and fresh runs since the last :func:`forget`, entries and bytes kept."""
    return {**_counts, "entries": len(_entries), "bytes": sum(e.nbytes for e in _entries)}


def _keep(module: nn.Module, state: tuple, ask: tuple, kwargs: dict[str, Any], recording: Any,
          tensors: list[torch.Tensor]) -> None:
    unique = {id(t): t for t in tensors}.values()
    nbytes = sum(t.numel() * t.element_size() for t in unique)
    if nbytes > MAX_BYTES:
        return
    inputs = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
              for k, v in kwargs.items()}
    _entries.append(_Entry(weakref.ref(module, _purge), state, ask, inputs, recording,
                           [(t, t._version) for t in unique], nbytes))
    while len(_entries) > MAX_ENTRIES or sum(e.nbytes for e in _entries) > MAX_BYTES:
        _entries.pop(0)


def _reusable(module: nn.Module) -> bool:
    if torch.is_grad_enabled() or _global_hooks():
        return False
    for m in module.modules():
        if m.training or m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
            return False
    return True


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _state(module: nn.Module) -> tuple:
    """What the model is now: storage, shape, dtype, device, version and the bits of each
    parameter and buffer (an edit through ``p.data`` keeps the version, not the bits), the
    module tree (a submodule swapped for one without weights), and the attention
    implementation of each config."""
    tensors = [*module.named_parameters(remove_duplicate=False),
               *module.named_buffers(remove_duplicate=False)]
    weights = tuple((name, t.data_ptr(), tuple(t.shape), t.dtype, str(t.device), t._version,
                     _bits(t)) for name, t in tensors)
    tree = tuple((name, type(m), id(m)) for name, m in module.named_modules())
    configs = tuple(sorted({(n, getattr(m.config, "_attn_implementation", None))
                            for n, m in module.named_modules() if hasattr(m, "config")},
                           key=str))
    return weights, tree, configs


_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> int | None:
    """A checksum of a tensor's bits (its values read as integers, summed in chunks so no
    large copy is made), or None where it has none (meta tensors, odd widths)."""
    if t.device.type == "meta" or t.numel() == 0 or t.element_size() not in _INT_OF_WIDTH \
            or t.dtype.is_complex or t.dtype == torch.bool:
        return None
    ints = t.detach().reshape(-1).view(_INT_OF_WIDTH[t.element_size()])  # no grad-mode change
    return sum(int(chunk.sum(dtype=torch.int64)) for chunk in ints.split(1 << 22))


def same_inputs(kept: dict[str, Any], now: dict[str, Any]) -> bool:
    """Equal inputs or options: tensors equal in shape, dtype, device and values."""
    if kept.keys() != now.keys():
        return False
    for key, value in now.items():
        old = kept[key]
        if isinstance(value, torch.Tensor) or isinstance(old, torch.Tensor):
            if not (isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor)
                    and old.shape == value.shape and old.dtype == value.dtype
                    and old.device == value.device and torch.equal(old, value)):
                return False
        elif not _equal(old, value):
            return False
    return True


def _equal(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - a value without a truth value: not known to be equal
        return False
