"""Checking a sweep's choices before anything runs: site names (module, head and latent
sites), the method's options (AtP*'s switches, the window) and the model's sites.

>>> site_names("resid_pre, mlp_out")
['resid_pre', 'mlp_out']
"""

from __future__ import annotations

from typing import Any

from ipy_intervene.arch.sites import MODULE_SITES, Adapter, adapter_for
from ipy_intervene.errors import InputError, SiteError
from ipy_intervene.model.loading import wrap
from ipy_intervene.sweep import atp_star
from ipy_intervene.sweep import latents as latent_sites
from ipy_intervene.sweep.experts import EXPERT_SITES
from ipy_intervene.sweep.heads import HEAD_SITES


def site_names(site: Any, model: Any = None) -> list[str]:
    """The site names of ``site``: a name, names joined by commas, or a list of names (in
    order, each once), all checked before anything runs (latent sites against ``model``'s
    splices)."""
    names = [n for n in site.split(",") if n.strip()] if isinstance(site, str) else site
    if not isinstance(names, (list, tuple)):
        raise InputError(f"site must be a site name or a list of names; got "
                         f"{type(site).__name__}. {_SITES_HINT}")
    strange = [name for name in names if not isinstance(name, str)]
    if strange:
        raise InputError(f"site={site!r}: {strange[0]!r} is not a site name. {_SITES_HINT}")
    names = list(dict.fromkeys(name.strip() for name in names))
    if not names:
        raise InputError(f"site={site!r} names no site. {_SITES_HINT}")
    for name in names:
        if name not in MODULE_SITES and name not in HEAD_SITES and name not in EXPERT_SITES and (
                model is None or latent_sites.find_splice(model, name) is None):
            spliced = latent_sites.site_names(model) if model is not None else []
            latent = f"; latent sites (ii.attach): {', '.join(spliced)}" if spliced else ""
            raise SiteError(f"unknown site {name!r}; sweep sites: "
                            f"{', '.join([*MODULE_SITES, *HEAD_SITES, *EXPERT_SITES])}{latent}")
    return names


_SITES_HINT = ("One site: site='resid_pre'; several, one result each (a dict by site): "
               "site=['resid_pre', 'mlp_out'] or site='resid_pre,mlp_out'")


def check_sites(model: Any, sites: list[str], method: str, adapter: Adapter | None) -> None:
    """Fail before the first of several sweeps, not after sweeping the others, when one site
    does not exist in the model (resid_mid with a parallel residual) or for the method."""
    model = wrap(model)
    found = adapter_for(model, adapter)
    for name in sites:
        if name not in MODULE_SITES and name not in HEAD_SITES:
            latent_sites.check_method(name, method)
            continue
        if method == "atp*" and name not in atp_star.ATP_SITES:
            raise SiteError(f"AtP* sweeps the sites {', '.join(atp_star.ATP_SITES)}; got {name!r}")
        if name in MODULE_SITES:
            found.module(model.module, name, 0)
        elif method not in ("activation", "path", "atp*") and not (
                method == "attribution" and name in atp_star.HEAD_INPUT_SITES):
            raise head_site_error(name, method)


def atp_options(method: str, qk_fix: bool | None, grad_drop: bool | None) -> dict[str, bool]:
    """AtP*'s switches (both on unless turned off); an error with another method."""
    given = {k: v for k, v in (("qk_fix", qk_fix), ("grad_drop", grad_drop)) if v is not None}
    if given and method != "atp*":
        raise InputError(f"{', '.join(given)} switch parts of AtP* on or off: they apply to "
                         f"method='atp*', not method={method!r}")
    for name, value in given.items():
        if not isinstance(value, bool):
            raise InputError(f"{name}={value!r}: True or False")
    return {"qk_fix": given.get("qk_fix", True), "grad_drop": given.get("grad_drop", True)}


def head_site_error(site: str, method: str) -> InputError:
    also = ", 'attribution' or 'atp*'" if site in atp_star.HEAD_INPUT_SITES else ""
    return InputError(f"site {site!r} is swept with method='activation' (exact){also}; "
                      f"{method!r} covers the sites {', '.join(MODULE_SITES)}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{name}={value!r} is not one of: {', '.join(choices)}")


def check_window(window: int, method: str) -> int:
    if not isinstance(window, int) or window < 1:
        raise InputError(f"window={window!r}: the number of layers restored together, >= 1")
    if window > 1 and method == "attribution":
        raise InputError("window applies to activation patching and causal tracing, not to "
                         "attribution patching")
    return window
