"""Activation cache: the sites you ask for, for a set of prompts, each prompt's values without
its padding (TransformerLens's ``run_with_cache`` habit, for many prompts at once).

The prompts run in chunks of ``batch_size`` (left-padded, so every prompt sees the positions
it has alone; by default as many prompts as keep one chunk's values of the sites asked for
under :data:`CHUNK_BYTES`, at most 64); only the sites and layers asked for are kept, on
``device`` (default: the CPU), so memory grows with what you keep, not with the model. A
progress bar shows the chunks of a large set.

Site names: the sweep vocabulary (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``,
``mlp_out``, ``head_out``), the sites inside attention (``q``, ``k``, ``v``, ``pattern``,
``z``, ``result``: :mod:`ipy_intervene.arch.attention`) and ``embed`` (the token embeddings).
One prompt's value has the site's shape without the batch dimension and with that prompt's
positions only: ``[pos, d_model]`` for the residual sites, ``[head, pos, d_head]`` for
``q``/``k``/``v``, ``[head, query, key]`` for ``pattern``, ``[pos, head, d_head]`` for
``z`` and ``head_out``, ``[pos, head, d_model]`` for ``result``.

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> c = ii.cache(model, ["When Mary and John went to the store", "Then John had"],
...              sites=["resid_post", "pattern"])
>>> [tuple(x.shape) for x in c["resid_post", 3]]
[(9, 128), (4, 128)]
>>> tuple(c["pattern", 1][1].shape)
(4, 4, 4)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ipy_intervene.arch import attention
from ipy_intervene.arch.sites import MODULE_SITES, Adapter, adapter_for, get_path, split_heads
from ipy_intervene.errors import InputError, SiteError
from ipy_intervene.infra.hooks import HookSession, entry_point, tap
from ipy_intervene.infra.progress import progress_disabled
from ipy_intervene.model.envoys import Model
from ipy_intervene.model.loading import warn_if_training, wrap

CHUNK_BYTES = 1 << 30     # one chunk's values of the sites asked for, at most (default size)
ALL_SITES = ("embed", *MODULE_SITES, *attention.ATTENTION_SITES)
# the position dimensions of one prompt's value (query dims first)
_POS_DIMS = {"q": (1,), "k": (1,), "v": (1,), "pattern": (1, 2)}


@dataclass
class ActivationCache:
    """Site values of many prompts: ``cache[site, layer][i]`` is prompt ``i``'s value,
    without padding (``cache["embed"][i]`` for the embeddings).

    ``positions`` (None: all) are the positions kept, counted in each prompt (negative: from
    its end); ``lengths[i]`` is prompt ``i``'s token count, ``input_ids[i]`` its tokens.
    """

    values: dict[tuple[str, int | None], list[torch.Tensor]]
    input_ids: list[torch.Tensor]
    n_layers: int
    positions: list[int] | None = None
    decode: Any = field(default=None, repr=False)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    @property
    def sites(self) -> list[str]:
        return list(dict.fromkeys(site for site, _ in self.values))

    def layers(self, site: str) -> list[int]:
        """The layers kept for ``site``."""
        return [layer for s, layer in self.values if s == site and layer is not None]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __contains__(self, key: Any) -> bool:
        try:
            self._key(key)
        except SiteError:
            return False
        return True

    def __getitem__(self, key: Any) -> list[torch.Tensor]:
        """``cache["resid_post", 3]`` (negative layers count from the end), ``cache["embed"]``:
        one tensor per prompt."""
        return self.values[self._key(key)]

    def _key(self, key: Any) -> tuple[str, int | None]:
        site, layer = (key, None) if isinstance(key, str) else tuple(key)
        if site == "embed" or layer is None:
            if (site, None) in self.values:
                return site, None
            raise SiteError(f"cache[{site!r}] needs a layer: cache[{site!r}, layer]"
                            if site != "embed" else self._missing(site))
        if isinstance(layer, int) and -self.n_layers <= layer < 0:
            layer += self.n_layers
        if (site, layer) not in self.values:
            raise SiteError(self._missing(site, layer))
        return site, layer

    def _missing(self, site: str, layer: int | None = None) -> str:
        kept = ", ".join(f"{s}" + ("" if l is None else f"[{l}]") for s, l in self.values)
        where = site if layer is None else f"{site} at layer {layer}"
        return (f"{where} is not in this cache; it holds {kept}. Ask for it: "
                f"ii.cache(model, prompts, sites=[...], layers=[...])")

    def str_tokens(self, prompt: int) -> list[str]:
        """Prompt ``prompt``'s tokens as strings (ids without a tokenizer)."""
        ids = self.input_ids[prompt].tolist()
        return [self.decode([i]) for i in ids] if self.decode else [str(i) for i in ids]

    def padded(self, site: str, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every prompt's value in one tensor, left-padded with zeros as a trace's batch is,
        and the mask ``[prompts, pos]`` (True: a real position).

        >>> x, mask = c.padded("resid_post", 3)        # [2, 9, 128], [2, 9]   # doctest: +SKIP
        """
        values = self[site if layer is None else (site, layer)]
        dims = _POS_DIMS.get(site, (0,))
        width = max(v.shape[dims[0]] for v in values)
        out = values[0].new_zeros((len(values), *_with(values[0].shape, dims, width)))
        mask = torch.zeros(len(values), width, dtype=torch.bool)
        for i, v in enumerate(values):
            n = v.shape[dims[0]]
            index = [i] + [slice(None)] * v.dim()
            for d in dims:
                index[d + 1] = slice(width - n, width)
            out[tuple(index)] = v
            mask[i, width - n:] = True
        return out, mask

    def stack(self, site: str, pos: int = -1, layers: Sequence[int] | None = None) -> torch.Tensor:
        """One position of every prompt (``pos`` counted in each prompt; -1: its last token;
        an error when the cache did not keep it) at ``layers`` (default: all kept):
        ``[prompts, layers, ...]``, the features of a probe.

        >>> X = c.stack("resid_post", pos=-1)        # [prompts, layers, d_model]  # doctest: +SKIP
        """
        chosen = self.layers(site) if layers is None else [self._key((site, l))[1] for l in layers]
        if not chosen:
            raise SiteError(self._missing(site))
        rows = [torch.stack([self.at((site, layer), i, pos) for i in range(len(self))])
                for layer in chosen]
        return torch.stack(rows, 1)

    def at(self, key: Any, prompt: int, pos: int) -> torch.Tensor:
        """Prompt ``prompt``'s value at token ``pos`` of that prompt (negative: from its end),
        also when the cache kept only some positions.

        >>> c.at(("resid_post", 3), prompt=1, pos=-1).shape         # [128]  # doctest: +SKIP
        """
        values = self[key]
        if not -len(values) <= prompt < len(values):
            raise InputError(f"prompt {prompt} is not in this cache of {len(values)} prompts")
        length = self.lengths[prompt]
        token = _index(pos, length, prompt)
        dim = _POS_DIMS.get(key if isinstance(key, str) else key[0], (0,))[0]
        if self.positions is None:
            return values[prompt].select(dim, token)
        kept = [p % length for p in self.positions]
        if token not in kept:
            raise InputError(f"position {pos} of prompt {prompt} was not kept: this cache kept "
                             f"positions {self.positions} of each prompt")
        return values[prompt].select(dim, kept.index(token))

    @property
    def nbytes(self) -> int:
        """Bytes the kept values take."""
        return sum(v.numel() * v.element_size() for vs in self.values.values() for v in vs)

    def __repr__(self) -> str:
        kept = ", ".join(f"{site} x {len(self.layers(site)) or 1}" for site in self.sites)
        return (f"ActivationCache({len(self)} prompts, {min(self.lengths)}.."
                f"{max(self.lengths)} tokens; {kept}; {self.nbytes / 2**20:.1f} MiB)")


def _with(shape: torch.Size, dims: tuple[int, ...], width: int) -> list[int]:
    return [width if d in dims else n for d, n in enumerate(shape)]


def _index(pos: int, length: int, prompt: int) -> int:
    if not -length <= pos < length:
        raise InputError(f"position {pos} is outside prompt {prompt} ({length} positions kept)")
    return pos % length


@entry_point
def cache(model: Any, prompts: Any, sites: Sequence[str] | str = ("resid_post",),
          layers: Sequence[int] | int | None = None, *, positions: Sequence[int] | int | None = None,
          batch_size: int | None = None, device: Any = "cpu", dtype: torch.dtype | None = None,
          adapter: Adapter | None = None) -> ActivationCache:
    """Run ``prompts`` (a prompt, a list of prompts or of token-id lists, or a 2-D id tensor)
    and keep ``sites`` at ``layers`` (default: all), each prompt without its padding.

    ``positions``: keep only these positions of each prompt (negative: from its end; the
    query positions of ``pattern``) to bound memory; ``device``/``dtype``: where and how the
    values are kept.

    >>> c = ii.cache(model, prompts, sites=["resid_post", "pattern"])     # doctest: +SKIP
    >>> c["resid_post", -1][0].shape                                     # doctest: +SKIP
    """
    model = wrap(model)
    warn_if_training(model)
    adapter = adapter_for(model, adapter)
    items = _prompts(prompts)
    plan = _plan([sites] if isinstance(sites, str) else list(sites), layers, adapter)
    kept = _positions(positions)
    if batch_size is None:
        batch_size = _chunk_size(model, adapter, plan, items)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int; got {batch_size!r}")
    values: dict[tuple[str, int | None], list[torch.Tensor]] = {key: [] for key in plan}
    input_ids: list[torch.Tensor] = []
    chunks = range(0, len(items), batch_size)
    bar = tqdm(chunks, desc="cache", delay=1.0, leave=False, disable=_quiet() or len(chunks) < 2)
    with torch.no_grad():
        for start in bar:
            _run_chunk(model, adapter, plan, items[start:start + batch_size], kept, values,
                       input_ids, torch.device(device), dtype)
    decode = model.tokenizer.decode if model.tokenizer is not None else None
    return ActivationCache(values, input_ids, adapter.n_layers, kept, decode)


def _chunk_size(model: Model, adapter: Adapter, plan: list[tuple[str, int | None]],
                items: list[Any]) -> int:
    """Prompts per chunk: the chunk's site values (at the longest prompt's length) stay under
    CHUNK_BYTES; at most 64."""
    length = model.prepare(items).length
    param = next(model.module.parameters())
    d_model = model.module.get_input_embeddings().weight.shape[1]
    heads = adapter.n_heads
    per_position = {"pattern": heads * length, "result": heads * d_model}
    row = sum(per_position.get(site, d_model) for site, _ in plan) * length
    return max(1, min(64, CHUNK_BYTES // max(1, row * param.element_size())))


def _quiet() -> bool:
    return progress_disabled()


def _prompts(prompts: Any) -> list[Any]:
    """One INPUT per prompt."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            return [prompts]
        if prompts.dim() != 2 or prompts.is_floating_point() or prompts.is_complex():
            raise InputError(f"prompts as a tensor are token ids: [seq] for one prompt or "
                             f"[batch, seq] for several; got a {prompts.dtype} tensor of "
                             f"shape {list(prompts.shape)}")
        return list(prompts)
    if isinstance(prompts, (list, tuple)) and prompts:
        if all(isinstance(p, int) for p in prompts):
            return [list(prompts)]
        return list(prompts)
    raise InputError(f"prompts must be a prompt, a list of prompts (strings or token-id "
                     f"lists) or a 2-D token id tensor; got {type(prompts).__name__}"
                     + (" (empty)" if isinstance(prompts, (list, tuple)) else ""))


def _plan(sites: list[str], layers: Sequence[int] | int | None,
          adapter: Adapter) -> list[tuple[str, int | None]]:
    n = adapter.n_layers
    given = list(range(n)) if layers is None else ([layers] if isinstance(layers, int)
                                                   else list(layers))
    bad = [l for l in given if not isinstance(l, int) or not -n <= l < n]
    if bad or not given:
        raise SiteError(f"layers {given} are not all layers of this model: it has {n} layers "
                        f"(0..{n - 1}, or -{n}..-1)")
    unknown = [s for s in sites if s not in ALL_SITES or s == "head_out_pos"]
    if unknown or not sites:
        raise SiteError(f"unknown site(s) {unknown}; sites: "
                        f"{', '.join(s for s in ALL_SITES if s != 'head_out_pos')}")
    plan: list[tuple[str, int | None]] = []
    for site in dict.fromkeys(sites):
        plan += [(site, None)] if site == "embed" else [(site, l % n) for l in given]
    return plan


def _positions(positions: Sequence[int] | int | None) -> list[int] | None:
    if positions is None:
        return None
    kept = [positions] if isinstance(positions, int) else list(positions)
    if not kept or not all(isinstance(p, int) and not isinstance(p, bool) for p in kept):
        raise InputError(f"positions must be ints (negative: from each prompt's end); got "
                         f"{positions!r}")
    return kept


def _run_chunk(model: Model, adapter: Adapter, plan: list[tuple[str, int | None]],
               items: list[Any], kept: list[int] | None, values: dict, input_ids: list,
               device: torch.device, dtype: torch.dtype | None) -> None:
    """One left-padded forward over ``items``; each site's rows, unpadded, into ``values``."""
    batch = model.prepare(items)
    mask = batch.kwargs["attention_mask"]
    lengths = [int(n) for n in mask.sum(1)]
    seen: dict[tuple[str, int | None], torch.Tensor] = {}
    with HookSession() as session:
        if any(site in attention.ATTENTION_SITES for site, _ in plan):
            attention.use_sites(session, model.module)
        for site, layer in plan:
            module, before = _where(model, adapter, site, layer)
            tap(session, module, before,
                lambda x, key=(site, layer): seen.__setitem__(key, x.detach()))
        extra = {"logits_to_keep": 1} if "logits_to_keep" in model._forward_params else {}
        model.module(**batch.kwargs, **extra)
    missing = [key for key in plan if key not in seen]
    if missing:
        raise SiteError(f"the forward never reached {missing[0][0]} at layer {missing[0][1]}")
    for key, x in seen.items():
        if key[0] in ("head_out",):
            x = split_heads(x, adapter.n_heads)
        dims = _POS_DIMS.get(key[0], (0,))
        x = x.to(device, dtype)          # one transfer per site and chunk, then per prompt
        for row, n in enumerate(lengths):
            values[key].append(_one(x[row], dims, n, kept, len(input_ids) + row).clone())
    ids = batch.kwargs["input_ids"]
    input_ids += [ids[row, ids.shape[1] - n:].cpu() for row, n in enumerate(lengths)]


def _one(x: torch.Tensor, dims: tuple[int, ...], n: int, kept: list[int] | None,
         row: int) -> torch.Tensor:
    """One prompt's value: its last ``n`` positions on each position dim, then ``kept``."""
    for d in dims:
        x = x.narrow(d, x.shape[d] - n, n)
    if kept is not None:
        index = torch.tensor([_index(p, n, row) for p in kept], device=x.device)
        x = x.index_select(dims[0], index)
    return x


def _where(model: Model, adapter: Adapter, site: str, layer: int | None) -> tuple[Any, bool]:
    """The module whose input (True) or output (False) is ``site`` at ``layer``."""
    root = model.module
    if site == "embed":
        return get_path(root, adapter.embed), False
    if site in attention.ATTENTION_SITES:
        return attention.site_point(root, adapter, layer, site), False
    kind = MODULE_SITES[site]
    return adapter.module(root, site, layer), kind.where in ("block_in", "module_in")
