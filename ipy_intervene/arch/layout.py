"""Where a site's value keeps its positions: which dimensions an invoke shorter than the
batch's longest prompt is cut on, so that it sees its own prompt's positions only (see
:class:`~ipy_intervene.runtime.values.View`). Known from the module and the value's place in its
structure, never from sizes alone:

- the sites inside attention (:mod:`ipy_intervene.arch.attention`) declare theirs: ``q``, ``k``,
  ``v`` ``[batch, head, pos, d_head]``; ``pattern`` ``[batch, head, query, key]``; ``z`` and
  ``result`` ``[batch, query, head, ...]``; an attention module returns ``(hidden states,
  pattern)``;
- Hugging Face's names: ``input_ids``/``position_ids``/``attention_mask`` ``[batch, pos]``
  (a 4-D mask ``[batch, 1, query, key]``), ``logits``/``hidden_states``/``inputs_embeds``
  ``[batch, pos, features]``, ``attentions`` ``[batch, head, query, key]``;
- modules whose last dimension is features (``nn.Linear``, ``Conv1D``, ``nn.Embedding``'s
  output, layer and RMS norms, transformers' decoder layers and MLPs): ``[batch, pos, ...,
  features]``; an embedding's input is ``[batch, pos]``, a model's (``get_input_embeddings``)
  its token ids;
- any other module: ``[batch, pos, features]``, the Hugging Face convention, when that is
  the only reading its shape allows.

A dimension is cut only where its size is the batch's positions at this step (the padded
length, plus the tokens generated so far for keys): a query of one new token is never cut.
Where the shape allows another reading (a 2-D ``[batch, n]``, another dimension of that
size, a leaf of rank 4 and more from an arbitrary module), :class:`Unknown` says why, and
the invoke's read or write is a clear error instead of a guess.

>>> features((2, 15, 128), 15), generic((2, 15, 128), 15), fixed(2, 3)((2, 4, 1, 15), 15)
((1,), (1,), (3,))
>>> generic((2, 15, 15), 15)
Traceback (most recent call last):
...
ipy_intervene.arch.layout.Unknown: dimensions 1 and 2 both have 15 entries
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

Shape = tuple[int, ...]
Leaf = Callable[[Shape, int], tuple[int, ...]]


class Unknown(Exception):
    """Which dimensions of a value are positions cannot be known: the reason."""


def _hits(shape: Shape, dims: range | tuple[int, ...], length: int) -> list[int]:
    return [d for d in dims if 0 < d < len(shape) and shape[d] == length]


def _only_dim_1(hits: list[int], shape: Shape, length: int, what: str) -> tuple[int, ...]:
    if not hits:
        return ()
    if hits == [1]:
        return (1,)
    if len(hits) == 1:
        raise Unknown(f"dimension {hits[0]} has {length} entries, and {what} keeps positions "
                      "on dimension 1")
    return _both(hits, length)


def _both(hits: list[int], length: int) -> tuple[int, ...]:
    names = ", ".join(map(str, hits[:-1])) + f" and {hits[-1]}"
    raise Unknown(f"dimensions {names} both have {length} entries" if len(hits) == 2 else
                  f"dimensions {names} all have {length} entries")


def fixed(*dims: int) -> Leaf:
    """A declared layout: ``dims`` are positions (cut where their size is the batch's)."""
    def leaf(shape: Shape, length: int) -> tuple[int, ...]:
        return tuple(_hits(shape, dims, length))
    leaf.__name__ = f"fixed{dims}"
    return leaf


def features(shape: Shape, length: int) -> tuple[int, ...]:
    """``[batch, pos, ..., features]``: the last dimension is never positions."""
    if len(shape) < 3:
        return ()
    return _only_dim_1(_hits(shape, range(1, len(shape) - 1), length), shape, length,
                       "a [batch, pos, ..., features] value")


def ids(shape: Shape, length: int) -> tuple[int, ...]:
    """``[batch, pos]`` (token ids, positions, a 2-D attention mask)."""
    if len(shape) == 2:
        return tuple(_hits(shape, (1,), length))
    return generic(shape, length)


def mask(shape: Shape, length: int) -> tuple[int, ...]:
    """An attention mask: ``[batch, key]``, or ``[batch, 1, query, key]``."""
    return tuple(_hits(shape, (2, 3), length)) if len(shape) == 4 else ids(shape, length)


def generic(shape: Shape, length: int) -> tuple[int, ...]:
    """A module whose layout is not declared: ``[batch, pos, features]`` when the shape
    allows no other reading."""
    hits = _hits(shape, range(1, len(shape)), length)
    if not hits:
        return ()
    if len(shape) == 2:
        raise Unknown(f"it is [batch, {length}]: {length} positions, or {length} features "
                      "of one vector per row")
    if len(shape) > 3:
        raise Unknown(f"a {len(shape)}-D value of this module has no known layout (dimension"
                      f"{'s' if len(hits) > 1 else ''} {', '.join(map(str, hits))} "
                      f"{'have' if len(hits) > 1 else 'has'} {length} entries)")
    return _only_dim_1(hits, shape, length, "a [batch, pos, features] value")


class Layout:
    """A value's layout: ``leaf`` for a tensor, ``items`` (by index or key) and ``each``
    (any other item) for a structure; items not named fall back on Hugging Face's names,
    else :func:`generic`."""

    def __init__(self, leaf: Leaf = generic, items: dict[Any, "Layout"] | None = None,
                 each: "Layout | None" = None) -> None:
        self.leaf, self.items, self.each = leaf, items or {}, each

    def at(self, key: Any) -> "Layout":
        if key in self.items:
            return self.items[key]
        if self.each is not None:
            return self.each
        return NAMED.get(key, GENERIC) if isinstance(key, str) else GENERIC

    def dims(self, shape: Shape, length: int) -> tuple[int, ...]:
        return self.leaf(tuple(shape), length)

    def __repr__(self) -> str:
        return f"Layout({getattr(self.leaf, '__name__', self.leaf)})"


GENERIC = Layout()
FEATURES = Layout(features)
IDS = Layout(ids)
PATTERN = Layout(fixed(2, 3))
KEYS = Layout(fixed(2))
KEYS.each = KEYS                      # legacy past_key_values: tuples of [b, kv, key, d]
NAMED: dict[str, Layout] = {
    "input_ids": IDS, "position_ids": IDS, "token_type_ids": IDS, "labels": IDS,
    "attention_mask": Layout(mask),
    "hidden_states": Layout(features, each=FEATURES), "last_hidden_state": FEATURES,
    "inputs_embeds": FEATURES, "logits": FEATURES,
    "position_embeddings": Layout(features, each=FEATURES),   # (cos, sin) [b, pos, d]
    "attentions": Layout(fixed(2, 3), each=PATTERN),
    "past_key_values": KEYS,
}
SITE_LAYOUTS = {"q": KEYS, "k": KEYS, "v": KEYS, "pattern": PATTERN,
         "z": Layout(fixed(1)), "result": Layout(fixed(1))}
ATTENTION_OUTPUT = Layout(items={0: FEATURES, 1: PATTERN})


def _hf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _features_last(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, nn.LayerNorm)) or type(module).__name__ == "Conv1D":
        return True
    if isinstance(module, getattr(nn, "RMSNorm", ())):
        return True
    name = type(module).__name__
    return _hf(module) and name.endswith(("LayerNorm", "RMSNorm", "MLP", "Block", "Layer"))


def of_output(module: nn.Module) -> Layout:
    """The layout of ``module``'s output."""
    from ipy_intervene.arch import attention, moe

    if isinstance(module, attention.HookPoint):
        return SITE_LAYOUTS.get(module.name, GENERIC)
    if isinstance(module, moe.MoePoint):
        return FEATURES
    if attention.is_attention(module):
        return ATTENTION_OUTPUT
    if isinstance(module, nn.Embedding) or _features_last(module):
        return FEATURES
    return GENERIC


def of_input(module: nn.Module, key: int | str = 0) -> Layout:
    """The layout of ``module``'s input ``key`` (a positional argument's index, else a
    keyword's name): by the name of the forward's parameter where Hugging Face names it
    (``hidden_states``, ``attention_mask``, ...), else by the module."""
    from ipy_intervene.arch import attention, moe

    name = key if isinstance(key, str) else _parameter(module, key)
    if name in NAMED:
        return NAMED[name]
    if key not in (0, None):
        return GENERIC
    if isinstance(module, attention.HookPoint):
        return SITE_LAYOUTS.get(module.name, GENERIC)
    if isinstance(module, moe.MoePoint):
        return FEATURES
    if isinstance(module, nn.Embedding) or (
            hasattr(module, "get_input_embeddings") and hasattr(module, "config")):
        return IDS
    if attention.is_attention(module) or _features_last(module):
        return FEATURES
    return GENERIC


def of_inputs(module: nn.Module, count: int = 0) -> Layout:
    """The layout of an ``(args, kwargs)`` pair (``count`` positional arguments)."""
    args = Layout(items={i: of_input(module, i) for i in range(count)})
    return Layout(items={0: args, 1: Layout()})


def _parameter(module: nn.Module, index: int | None) -> str | None:
    """The name of the forward's parameter that positional argument ``index`` binds."""
    if index is None:
        return None
    names = _PARAMETERS.get(type(module))
    if names is None:
        try:
            params = inspect.signature(type(module).forward).parameters.values()
            names = tuple(p.name for p in params  # the class's: a trace may replace the instance's
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))[1:]
        except (TypeError, ValueError):
            names = ()
        _PARAMETERS[type(module)] = names
    return names[index] if index < len(names) else None


_PARAMETERS: dict[type, tuple[str, ...]] = {}
