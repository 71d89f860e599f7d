"""Custom sites in sweeps: a dictionary (``ii.Direction``, ``ii.Subspace``, ``ii.Neurons``,
``ii.Custom``, an SAE: anything with ``encode``/``decode``) read at a module site of every
layer, so direction and subspace patching (interchange interventions) run through the
batched engine.

A cell (layer, position) interchanges the dictionary's coordinates (``latents``: all, or
those chosen) of the base run with the source run's there, with the error term kept, as a
splice (``ipy_intervene/features/splice.py``) at that site would:

    lat = encode(x_base);  lat2 = lat with lat2[latents] = encode(x_source)[latents]
    x'  = decode(lat2) + (x_base - decode(lat))

So for a direction only the component along it changes, for a subspace only the projection
on it. The patched value does not depend on the cell (a patch at position ``p`` of layer
``l`` cannot change ``x_base`` there), so the engine patches ``x'`` like a plain source
value, many cells per forward; ``method="attribution"`` gives ``(x' - x_base) . d metric /
d x`` at the base run.

>>> r = ii.patch_sweep(model, clean, corrupt, ii.logit_diff("Mary", "John"),
...                    site="resid_post", dictionary=ii.Direction(v))      # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ipy_intervene.analysis.inputs import index_list
from ipy_intervene.errors import InputError
from ipy_intervene.features.splice import dictionary_dtype

DICTIONARY_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
METHODS = ("activation", "attribution")

Interchange = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check(dictionary: Any, site: str, method: str) -> None:
    """A clear error before anything runs for what a custom site does not cover."""
    for name in ("encode", "decode"):
        if not callable(getattr(dictionary, name, None)):
            raise InputError(f"dictionary= needs encode(x) -> coordinates and decode(c) -> x "
                             f"(ii.Direction, ii.Subspace, ii.Neurons, ii.Custom, an SAE); "
                             f"{type(dictionary).__name__} has no `{name}`")
    if site not in DICTIONARY_SITES:
        raise InputError(f"dictionary= reads a module site of every layer: one of "
                         f"{', '.join(DICTIONARY_SITES)}; got site={site!r}")
    if method not in METHODS:
        raise InputError(f"dictionary= is swept with method {' or '.join(METHODS)}; got "
                         f"method={method!r}")


def interchange(dictionary: Any, latents: Any) -> Interchange:
    """``(base [rows, P, d], source [rows, P, d]) -> x'`` (see the module docstring)."""

    def patched(base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        if isinstance(dictionary, torch.nn.Module):   # as ii.attach does: the site's device
            dictionary.to(base.device)
        dtype = dictionary_dtype(dictionary, base)
        with torch.no_grad():
            x = base.detach().to(dtype)
            lat = dictionary.encode(x)
            theirs = dictionary.encode(source.detach().to(x.device, dtype))
            chosen = index_list(latents, lat.shape[-1], "latent")
            lat2 = lat.clone()
            lat2[..., chosen] = theirs[..., chosen]
            return (dictionary.decode(lat2) + (x - dictionary.decode(lat))).to(base.dtype)

    return patched


def replace_sources(base: Any, source: Any, fn: Interchange) -> None:
    """Each recorded source value becomes the interchanged value ``x'`` (in place)."""
    for layer, value in source.sites.items():
        source.sites[layer] = fn(base.sites[layer], value)


def describe(dictionary: Any, latents: Any) -> dict[str, Any]:
    """For ``result.extra``."""
    return {"dictionary": repr(dictionary).replace("\n", " "),
            "latents": "all" if latents is None else list(latents)}
