"""Architecture adapters: one site vocabulary (``resid_pre``, ``attn_out``, ...) on every model.

An :class:`~ipy_intervene.arch.adapter.Adapter` names, for one architecture family, the modules
where each site lives. Every analysis reads it through :func:`adapter_for`; so can a cell
(``adapter.module(model, "mlp_out", 2)``).

>>> import ipy_intervene as ii
>>> adapter = adapter_for(ii.load_model("demo"))
>>> adapter.name, adapter.n_layers, adapter.n_heads
('gpt2', 4, 4)
>>> adapter.site_path("mlp_out", 2)
'transformer.h[2].mlp'
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from ipy_intervene.arch.adapter import (MODULE_SITES, Adapter, SiteKind, Where, get_path,
                                        site_kind, split_heads)
from ipy_intervene.arch.check import checked
from ipy_intervene.arch.discover import discovered
from ipy_intervene.arch.families import FAMILIES, family_adapter
from ipy_intervene.errors import SiteError

__all__ = ["MODULE_SITES", "Adapter", "SiteKind", "Where", "adapter_for", "declare", "declared",
           "family_names", "get_path", "site_kind", "split_heads"]


def family_names() -> tuple[str, ...]:
    """The ``model_type`` of every family in the table."""
    return tuple(FAMILIES)


# Maps set on a model (ii.wrap(..., adapter=), ii.load_model(..., adapter=), model.adapter =):
# the one place every analysis finds a hand-made map, keyed by the module itself.
_declared: "weakref.WeakKeyDictionary[nn.Module, Adapter]" = weakref.WeakKeyDictionary()


def declare(model: Any, adapter: Adapter | None) -> None:
    """Make ``adapter`` the map of ``model`` for every analysis (checked now: a wrong map is
    a SiteError here); None forgets it (the family's map, or discovery, again).

    >>> declare(model, ii.Adapter("mine", blocks="backbone.layers", ...))   # doctest: +SKIP
    """
    module = getattr(model, "module", model)
    if adapter is None:
        _declared.pop(module, None)
        return
    if not isinstance(adapter, Adapter):
        raise SiteError(f"a model's adapter must be an ii.Adapter; got {type(adapter).__name__}")
    found = adapter.with_layers(module) if not adapter.n_layers else adapter
    _declared[module] = checked(module, found)


def declared(model: Any) -> Adapter | None:
    """The map set on ``model`` by hand, or None."""
    return _declared.get(getattr(model, "module", model))


def adapter_for(model: Any, adapter: Adapter | None = None, *, check: bool = True) -> Adapter:
    """The adapter of a model (an ``ii.Model`` or a Hugging Face causal LM): ``adapter`` (one
    by hand), else the one set on the model (:func:`declare`), else the family's from the
    table, else one discovered from the module tree (:mod:`ipy_intervene.arch.discover`).
    Every map is checked on one small forward of this model the first time
    (:mod:`ipy_intervene.arch.check`: a map whose sites would be wrong is a SiteError)."""
    module = getattr(model, "module", model)
    if adapter is None:
        adapter = _declared.get(module)
    if adapter is not None:
        found = adapter.with_layers(module) if not adapter.n_layers else adapter
    else:
        found = family_adapter(module)
        if found is None:
            return discovered(module)        # checked there (it picks the map that passes)
    return checked(module, found) if check else found
