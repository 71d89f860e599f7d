"""The site vocabulary (``resid_pre``, ``attn_out``, ...) and the :class:`Adapter`: where
the sites of one architecture live and what the model does around its blocks. The maps
themselves come from :mod:`ipy_intervene.arch.sites` (``adapter_for``).

>>> Adapter("mine", blocks="b", final_norm="n", unembed="u", embed="e", attn="a", mlp="m",
...         mid_norm="n2", head_proj="a.o", n_heads=2).site_path("mlp_out", 1)
'b[1].m'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from ipy_intervene.errors import SiteError

Where = Literal["block_in", "block_out", "module_in", "module_out"]


@dataclass(frozen=True)
class SiteKind:
    """How a site is read: the input or output of a module (``part`` of the block)."""

    name: str
    where: Where
    part: str | None  # adapter attribute naming the module inside the block; None: the block
    per_head: bool = False
    per_position: bool = True
    doc: str = ""


MODULE_SITES: dict[str, SiteKind] = {s.name: s for s in (
    SiteKind("resid_pre", "block_in", None, doc="residual stream entering block l"),
    SiteKind("resid_mid", "module_in", "mid_norm",
             doc="residual stream between attention and MLP (the input of the module that "
                 "reads it after attention's add); none under a parallel residual"),
    SiteKind("resid_post", "block_out", None, doc="residual stream leaving block l"),
    SiteKind("attn_out", "module_out", "attn",
             doc="what attention adds to the residual stream (after a post-norm)"),
    SiteKind("mlp_out", "module_out", "mlp",
             doc="what the MLP adds to the residual stream (after a post-norm)"),
    SiteKind("head_out", "module_in", "head_proj", per_head=True, per_position=False,
             doc="one head's output z (input of the attention out-projection), all positions; "
                 "under a post-norm its write is not linear (see Adapter.nonlinear_heads)"),
    SiteKind("head_out_pos", "module_in", "head_proj", per_head=True,
             doc="one head's output at one position"),
)}
# attn_out / mlp_out: the output of the post-norm where the family has one
_POST = {"attn": "post_attn_norm", "mlp": "post_mlp_norm"}


@dataclass(frozen=True)
class Adapter:
    """Where the sites live in one architecture; paths are attribute paths from the model.

    Pass one by hand for an architecture ipy_intervene does not know (or set it once on the
    model: ``ii.wrap(module, tok, adapter=...)`` or ``model.adapter = ...``; every analysis
    then reads it)::

        ii.Adapter("mine", blocks="backbone.layers", final_norm="backbone.norm",
                   unembed="head", embed="backbone.embed", attn="attn", mlp="ffn",
                   mid_norm="norm2", head_proj="attn.out", n_heads=8)

    What the sublayers add and what the model does around the blocks (each is proven by the
    self-check, :mod:`ipy_intervene.arch.check`, on the model's first analysis):

    - ``post_attn_norm`` / ``post_mlp_norm``: the norm after attention / the MLP (paths inside
      a block; Gemma 2/3, OLMo 2/3). ``attn_out`` / ``mlp_out`` are their outputs, what the
      block adds. ``mid_norm`` names the module whose input is ``resid_mid`` (Gemma 2:
      ``pre_feedforward_layernorm``; OLMo 2, which has no pre-MLP norm: ``mlp``);
    - ``embed_scale``: block 0 reads ``embed_scale`` times ``embed``'s output (Granite's
      embedding_multiplier; Gemma scales inside its embedding module, so 1 there);
    - ``residual_multiplier``: the block adds this times its sublayers' outputs (Granite).
      No module outputs that product, so where it is not 1 ``attn_out`` and ``mlp_out`` are
      refused (a read would be off by the factor); ``head_out`` (the out-projection's input)
      stays, and :func:`ii.decompose` applies the factor;
    - ``logit_scale`` / ``logit_softcap``: the logits are ``unembed(final_norm(h)) *
      logit_scale`` (Cohere's logit_scale; Granite: 1 / logits_scaling), then, with a cap
      ``c``, ``tanh(x / c) * c`` (Gemma 2/3's final soft-cap); :meth:`logits` applies both;
    - ``late_writer``: a module (path inside a block) whose output the block adds after the
      MLP's add, reading the stream the MLP left (Gemma 4's per-layer-input branch,
      ``post_per_layer_input_norm``); ``block_scale``: a tensor (path inside a block) the
      block multiplies its whole output by, residual included (Gemma 4's ``layer_scalar``).
      With either, ``resid_post != resid_mid + mlp_out``: the sites stay exact, the methods
      that sum the writers are refused (:meth:`unsummed`);
    - ``refused``: ``(site, reason)`` pairs for sites that do not exist on the model.

    Edge attribution and circuits (:mod:`ipy_intervene.circuit`) also need how attention
    computes its inputs (paths inside a block, like ``head_proj``):

    - ``attn_norm``: the norm whose output attention's q/k/v projections read;
    - ``mlp_norm``: the norm whose output the MLP reads (default: ``mid_norm``; with a
      parallel residual, the norm the MLP reads the block's input through, which may be
      ``attn_norm`` itself, as in GPT-J);
    - ``qkv``: the q/k/v projection(s), one path or three (``q``, ``k``, ``v``);
      ``qkv_layout`` says how their output columns split into heads (``d``: the head size,
      ``H`` heads, ``KV`` key/value heads, from the projections' widths):

      ``"separate"``  three projections, head (or kv head) ``i`` at columns ``i*d:(i+1)*d``
      ``"blocks"``    one: ``[q of each head | k of each kv head | v of each kv head]``
                      (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``)
      ``"per_head"``  one: for each head ``[q | k | v]`` (GPT-NeoX's ``query_key_value``)

    >>> Adapter("mine", blocks="b", final_norm="n", unembed="u", embed="e", attn="a",
    ...         mlp="m", mid_norm="n2", head_proj="a.o", n_heads=2,
    ...         attn_norm="n1", qkv=["a.q", "a.k", "a.v"]).qkv_layout
    'separate'
    """

    name: str
    blocks: str
    final_norm: str
    unembed: str
    embed: str
    attn: str
    mlp: str
    mid_norm: str | None
    head_proj: str
    n_heads: int
    n_layers: int = 0
    attn_norm: str | None = None
    mlp_norm: str | None = None
    qkv: tuple[str, ...] | None = None
    qkv_layout: str | None = None
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    embed_scale: float = 1.0
    residual_multiplier: float = 1.0
    logit_scale: float = 1.0
    logit_softcap: float | None = None
    late_writer: str | None = None
    block_scale: str | None = None
    refused: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        qkv = self.qkv
        if isinstance(qkv, str):
            qkv = (qkv,)
        elif qkv is not None:
            qkv = tuple(qkv)
        object.__setattr__(self, "qkv", qkv)
        if qkv is not None and len(qkv) == 3 and self.qkv_layout is None:
            object.__setattr__(self, "qkv_layout", "separate")
        refused = self.refused.items() if isinstance(self.refused, dict) else self.refused
        object.__setattr__(self, "refused", tuple((str(s), str(r)) for s, r in refused))

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        return get_path(model, self.blocks)[layer]

    def module(self, model: nn.Module, site: str, layer: int) -> nn.Module:
        """The module a site hooks at ``layer`` (the block itself for resid sites)."""
        kind = site_kind(site)
        block = self.block(model, layer)
        if kind.part is None:
            return block
        return get_path(block, self._part(kind))

    def site_path(self, site: str, layer: int) -> str:
        kind = site_kind(site)
        base = f"{self.blocks}[{layer}]"
        return base if kind.part is None else f"{base}.{self._part(kind)}"

    def _part(self, kind: SiteKind) -> str:
        reason = dict(self.refused).get(kind.name)
        if reason is not None:
            raise SiteError(f"site `{kind.name}` does not exist in {self.name} models: {reason}")
        if kind.name in ("attn_out", "mlp_out") and self.residual_multiplier != 1:
            raise SiteError(
                f"site `{kind.name}` does not exist in {self.name} models with "
                f"residual_multiplier={self.residual_multiplier:g}: the block adds "
                f"{self.residual_multiplier:g} times the {kind.part} module's output, a product "
                "no module outputs, so a read would be off by that factor; read resid_pre, "
                "resid_mid and resid_post (their differences are what each sublayer adds), "
                "head_out, or use ii.decompose (it applies the factor)")
        part = self.writer(kind.part) if kind.part in _POST else getattr(self, kind.part)
        if part is None:
            raise SiteError(f"site `{kind.name}` does not exist in {self.name} models with a "
                            "parallel residual (attention and MLP read the same stream); use "
                            "resid_pre, resid_post, attn_out or mlp_out")
        return part

    def writer(self, part: str) -> str:
        """The path (inside a block) of the module whose output the block adds for ``part``
        (``"attn"`` or ``"mlp"``): its post-norm where it has one, else the sublayer itself
        (times ``residual_multiplier``)."""
        return getattr(self, _POST[part]) or getattr(self, part)

    def with_layers(self, model: nn.Module) -> "Adapter":
        return replace(self, n_layers=len(get_path(model, self.blocks)))

    @property
    def post_norms(self) -> bool:
        """Whether a norm follows attention or the MLP (their writes are that norm's output)."""
        return self.post_attn_norm is not None or self.post_mlp_norm is not None

    def nonlinear_heads(self, method: str) -> str | None:
        """Why ``method`` (a method that needs each head's write into the residual stream to
        be linear in its ``z``: per-head decomposition and DLA; edge attribution sends from
        the whole attention write instead) has no meaning on this map; None where it has one."""
        if self.post_attn_norm is not None:
            return (f"{method} needs each head's write into the residual stream to be linear "
                    f"in its output z, but {self.name} puts a norm after attention "
                    f"({self.post_attn_norm}): what attention adds is "
                    f"{self.post_attn_norm}(o_proj(z of all heads)), not a sum over heads. "
                    "head_out here is each head's z (the out-projection's input): patch it, "
                    "or read attn_out (the norm's output) for the whole layer")
        return None

    def unsummed(self, method: str) -> str | None:
        """Why ``method`` (one that reads the residual stream as the sum of the embeddings
        and each block's ``attn_out`` and ``mlp_out``: decomposition, DLA, edge attribution,
        attribution graphs) has no meaning on this map; None where it has one.

        >>> Adapter("g", "b", "n", "u", "e", "a", "m", "n2", "a.o", 2,
        ...         block_scale="s").unsummed("decompose")[:40]
        'decompose reads the residual stream as t'
        """
        extra = [what for what, path in (
            (f"the output of {self.late_writer} (added after the MLP)", self.late_writer),
            (f"a scale {self.block_scale} that multiplies the whole stream", self.block_scale))
            if path is not None]
        if not extra:
            return None
        return (f"{method} reads the residual stream as the sum of the embeddings and each "
                f"block's attn_out and mlp_out, but a {self.name} block also has "
                f"{' and '.join(extra)}, so those parts do not add up to it. The sites "
                "(resid_pre, resid_mid, resid_post, attn_out, mlp_out, heads) are exact: "
                "patch or cache them")

    def require_summed(self, method: str) -> None:
        """A SiteError saying why, where ``method`` has no meaning on this map
        (:meth:`unsummed`)."""
        reason = self.unsummed(method)
        if reason is not None:
            raise SiteError(reason)

    def logits(self, root: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from a residual stream ``hidden`` (the last block's output):
        the final norm, the unembedding and the family's logit transform.

        >>> adapter.logits(model.module, resid_post_last)          # doctest: +SKIP
        """
        return self.transform_logits(get_path(root, self.unembed)(
            get_path(root, self.final_norm)(hidden)))

    def transform_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The unembedding's output ``x`` as the model returns it (scale, then soft-cap, in
        the order and dtype the model computes them)."""
        if self.logit_scale != 1:
            x = x * self.logit_scale
        if self.logit_softcap is not None:
            x = torch.tanh(x / self.logit_softcap) * self.logit_softcap
        return x


def site_kind(site: str) -> SiteKind:
    kind = MODULE_SITES.get(site)
    if kind is None:
        raise SiteError(f"unknown site {site!r}; sites: {', '.join(MODULE_SITES)}")
    return kind


def get_path(root: Any, path: str) -> Any:
    """``get_path(model, "transformer.h")``: follow a dotted attribute path."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[..., n_heads * d_head]`` -> ``[..., n_heads, d_head]`` (a view)."""
    return x.view(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)


def finite(value: Any, default: float = 1.0) -> float:
    """A config's multiplier as a float (``default`` when it is absent)."""
    return default if value is None or not math.isfinite(float(value)) else float(value)
