"""Where latents fire: a spliced dictionary's latents over a set of prompts, their top
activating tokens, and a latent x position grid for one prompt (shown by the feature view).

>>> acts = ii.feature_activations(model, model.transformer.h[2].sae, prompts)  # doctest: +SKIP
>>> acts.top_tokens(43, k=3)                                                    # doctest: +SKIP
[TopToken(prompt=4, pos=14, token='to', value=6.41, context='... gave a drink [to]'), ...]
>>> acts.show(latent=43, prompt=0)                                              # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ipy_intervene.errors import InputError, SiteError
from ipy_intervene.features.splice import Splice, attached, module_at
from ipy_intervene.infra.hooks import entry_point, site_hooks
from ipy_intervene.model.loading import wrap

CHUNK = 64          # prompts per forward
CONTEXT = 5         # tokens of context before a top token


@dataclass(frozen=True)
class TopToken:
    """One activation of a latent: prompt index, position, token, value, and the context
    before it with the token in brackets."""

    prompt: int
    pos: int
    token: str
    value: float
    context: str


@dataclass
class FeatureActivations:
    """Latent activations ``acts [prompts, positions, latents]`` (left-padded: a prompt's
    tokens are its last positions; padding is 0 and ``mask`` is False there), the tokens of
    each prompt (without padding), the latent index of each column, and the site."""

    acts: torch.Tensor
    mask: torch.Tensor
    tokens: list[list[str]]
    latents: list[int]
    site: str

    def column(self, latent: int) -> int:
        """The column of ``acts`` that holds ``latent``."""
        try:
            return self.latents.index(latent)
        except ValueError:
            raise InputError(f"latent {latent} was not recorded; recorded: "
                             f"{_short_list(self.latents)}") from None

    def of_prompt(self, prompt: int) -> torch.Tensor:
        """``[positions of that prompt, latents]``, padding removed."""
        if not -len(self.tokens) <= prompt < len(self.tokens):
            raise InputError(f"prompt {prompt}: there are {len(self.tokens)} prompts")
        n = len(self.tokens[prompt])
        return self.acts[prompt, self.acts.shape[1] - n:]

    def top_tokens(self, latent: int, k: int = 10) -> list[TopToken]:
        """The ``k`` strongest activations of ``latent`` over every prompt and position
        (only those above 0)."""
        values = self.acts[..., self.column(latent)].masked_fill(~self.mask, float("-inf"))
        flat = values.flatten()
        best = flat.topk(min(k, flat.numel()))
        out = []
        for value, index in zip(best.values.tolist(), best.indices.tolist()):
            if value <= 0:
                break
            row, col = divmod(index, values.shape[1])
            pos = col - (values.shape[1] - len(self.tokens[row]))
            out.append(TopToken(row, pos, self.tokens[row][pos], value, self._context(row, pos)))
        return out

    def _context(self, row: int, pos: int) -> str:
        words = [w.strip() for w in self.tokens[row][max(0, pos - CONTEXT):pos]]
        return " ".join(words + [f"[{self.tokens[row][pos].strip()}]"])

    def strongest(self, prompt: int, n: int = 12) -> list[int]:
        """The ``n`` latents with the largest activation anywhere in ``prompt``."""
        peak = self.of_prompt(prompt).max(0).values
        order = peak.argsort(descending=True)[:n]
        return [self.latents[int(i)] for i in order if float(peak[i]) > 0]

    def show(self, latent: int | None = None, prompt: int = 0, k: int = 10,
             rows: Sequence[int] | None = None) -> Any:
        """The feature view: ``latent``'s top tokens, and the latent x position grid of
        ``prompt`` (``rows``: its latents; default the strongest in that prompt)."""
        from ipy_intervene.widgets.feature_view import FeatureView

        return FeatureView(self, latent=latent, prompt=prompt, k=k, rows=rows)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return self.show()._repr_mimebundle_(include=include, exclude=exclude)

    def __repr__(self) -> str:
        return (f"FeatureActivations({self.site}: {len(self.latents)} latents over "
                f"{len(self.tokens)} prompts, {self.acts.shape[1]} positions)")


@entry_point
def feature_activations(model: Any, site: Any, prompts: str | Sequence[str], *,
                        latents: Sequence[int] | None = None) -> FeatureActivations:
    """The latents of a spliced dictionary over ``prompts`` (one batched forward per 64
    prompts, left-padded with the right positions; nothing of the model changes).

    ``site``: the splice, its envoy (``model.transformer.h[2].sae``) or path;
    ``latents``: which to keep (default all).

    >>> acts = ii.feature_activations(model, model.transformer.h[2].sae, prompts)  # doctest: +SKIP
    """
    model = wrap(model)
    splice = _splice(model, site)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts: a prompt string or a non-empty list of prompt strings")
    keep = _latents(latents)
    chunks, masks, tokens = [], [], []
    starts = range(0, len(prompts), CHUNK)
    for start in tqdm(starts, desc="feature activations", disable=len(starts) < 4):
        part = prompts[start:start + CHUNK]
        batch = model.prepare(part)
        seen: list[torch.Tensor] = []
        with torch.no_grad(), site_hooks([(splice.latents, "module_out", seen.append)]):
            model.module(**batch.kwargs)
        if not seen:
            raise SiteError(f"the forward never reached the splice at {splice.target_path}")
        acts = seen[0].detach()
        keep_now = keep if keep is not None else list(range(acts.shape[-1]))
        _check(keep_now, acts.shape[-1])
        chunks.append(acts[..., keep_now].float().cpu())
        masks.append(batch.kwargs["attention_mask"].bool().cpu())
        tokens += [model.to_str_tokens(p) for p in part]
    width = max(c.shape[1] for c in chunks)
    acts = torch.cat([torch.nn.functional.pad(c, (0, 0, width - c.shape[1], 0)) for c in chunks])
    mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in masks])
    return FeatureActivations(acts.masked_fill(~mask[..., None], 0.0), mask, tokens,
                              keep_now, _path(model, splice))


def _splice(model: Any, site: Any) -> Splice:
    if isinstance(site, Splice):
        return site
    module = getattr(site, "module", None)
    if isinstance(module, Splice):
        return module
    if isinstance(site, str):
        found = module_at(model.module, site)
        if isinstance(found, Splice):
            return found
        spliced = [s for s in attached(model).values() if s.target_path == site]
        if spliced:
            return spliced[0]
    where = ", ".join(attached(model)) or "none attached (ii.attach)"
    raise SiteError(f"{site!r} is not a spliced dictionary; splices: {where}")


def _path(model: Any, splice: Splice) -> str:
    return next((p for p, s in attached(model).items() if s is splice), splice.target_path)


def _latents(latents: Sequence[int] | None) -> list[int] | None:
    if latents is None:
        return None
    keep = [latents] if isinstance(latents, int) else list(latents)
    if not keep or not all(isinstance(j, int) and not isinstance(j, bool) for j in keep):
        raise InputError(f"latents: a list of latent indices; got {latents!r}")
    return keep


def _check(keep: list[int], width: int) -> None:
    bad = [j for j in keep if not 0 <= j < width]
    if bad:
        raise InputError(f"latent indices {bad} are out of range: the dictionary has {width} "
                         f"latents (0..{width - 1})")


def _short_list(values: list[int], n: int = 12) -> str:
    text = ", ".join(map(str, values[:n]))
    return text + (f", ... ({len(values)} in all)" if len(values) > n else "")
