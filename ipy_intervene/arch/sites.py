"""Architecture adapters: one site vocabulary (``resid_pre``, ``attn_out``, ...) on every model.

An :class:`Adapter` names, for one architecture family, the modules where each site lives.
Sweeps use it; so can a cell (``adapter.module(model, "mlp_out", 2)``).

>>> import ipy_intervene as ii
>>> adapter = adapter_for(ii.load_model("demo"))
>>> adapter.name, adapter.n_layers, adapter.n_heads
('gpt2', 4, 4)
>>> adapter.site_path("mlp_out", 2)
'transformer.h[2].mlp'
"""

from __future__ import annotations

from dataclasses import dataclass
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
             doc="residual stream between attention and MLP (the input of the second norm)"),
    SiteKind("resid_post", "block_out", None, doc="residual stream leaving block l"),
    SiteKind("attn_out", "module_out", "attn", doc="attention output, before the residual add"),
    SiteKind("mlp_out", "module_out", "mlp", doc="MLP output, before the residual add"),
    SiteKind("head_out", "module_in", "head_proj", per_head=True, per_position=False,
             doc="one head's output (input of the attention out-projection), all positions"),
    SiteKind("head_out_pos", "module_in", "head_proj", per_head=True,
             doc="one head's output at one position"),
)}


@dataclass(frozen=True)
class Adapter:
    """Where the sites live in one architecture; paths are attribute paths from the model.

    Pass one by hand for an architecture ipy_intervene does not know::

        ii.Adapter("mine", blocks="backbone.layers", final_norm="backbone.norm",
                   unembed="head", embed="backbone.embed", attn="attn", mlp="ffn",
                   mid_norm="norm2", head_proj="attn.out", n_heads=8)

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

    def __post_init__(self) -> None:
        qkv = self.qkv
        if isinstance(qkv, str):
            qkv = (qkv,)
        elif qkv is not None:
            qkv = tuple(qkv)
        object.__setattr__(self, "qkv", qkv)
        if qkv is not None and len(qkv) == 3 and self.qkv_layout is None:
            object.__setattr__(self, "qkv_layout", "separate")

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
        part = getattr(self, kind.part)
        if part is None:
            raise SiteError(f"site `{kind.name}` does not exist in {self.name} models with a "
                            "parallel residual (attention and MLP read the same stream); use "
                            "resid_pre, resid_post, attn_out or mlp_out")
        return part

    def with_layers(self, model: nn.Module) -> "Adapter":
        from dataclasses import replace

        return replace(self, n_layers=len(get_path(model, self.blocks)))


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


_LLAMA_LIKE = dict(blocks="model.layers", final_norm="model.norm", unembed="lm_head",
                   embed="model.embed_tokens", attn="self_attn", mlp="mlp",
                   mid_norm="post_attention_layernorm", head_proj="self_attn.o_proj",
                   attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
                   qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   qkv_layout="separate")

# Every family here has blocks whose attention and MLP outputs are added to the residual
# stream as they are (no multiplier, no norm after them), embeddings that reach block 0
# unscaled and logits that are the unembedding of the final norm; the self-check
# (:mod:`ipy_intervene.arch.check`) proves it on each model's first analysis. MoE families
# (mixtral, qwen2_moe, qwen3_moe): `mlp` is the sparse MoE block (its output, shared expert
# included, is mlp_out). Families with a parallel residual have mid_norm=None (GPT-J always;
# GPT-NeoX and StableLM when their config's flag in _PARALLEL is set). The q/k/v layouts
# (see Adapter) are those of transformers' modeling files: GPT-2's Conv1D c_attn is
# q|k|v, NeoX views query_key_value as [.., heads, 3 * head_size] then chunks q|k|v (per
# head), Phi-3 slices qkv_proj at H*d and H*d + KV*d, the others have q_proj/k_proj/v_proj.
_FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": dict(blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head",
                 embed="transformer.wte", attn="attn", mlp="mlp", mid_norm="ln_2",
                 head_proj="attn.c_proj", attn_norm="ln_1", mlp_norm="ln_2",
                 qkv=("attn.c_attn",), qkv_layout="blocks"),
    "gpt_neox": dict(blocks="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
                     unembed="lm_head", embed="gpt_neox.embed_in", attn="attention", mlp="mlp",
                     mid_norm="post_attention_layernorm", head_proj="attention.dense",
                     attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
                     qkv=("attention.query_key_value",), qkv_layout="per_head"),
    **{name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3")},
    "gptj": dict(blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head",
                 embed="transformer.wte", attn="attn", mlp="mlp", mid_norm=None,
                 head_proj="attn.out_proj", attn_norm="ln_1", mlp_norm="ln_1",
                 qkv=("attn.q_proj", "attn.k_proj", "attn.v_proj"), qkv_layout="separate"),
    **{name: _LLAMA_LIKE for name in ("mixtral", "olmo", "stablelm", "qwen2_moe",
                                      "qwen3_moe", "smollm3")},
    "phi3": {**_LLAMA_LIKE, "qkv": ("self_attn.qkv_proj",), "qkv_layout": "blocks"},
}
_PARALLEL = {"gpt_neox": "use_parallel_residual", "stablelm": "use_parallel_residual"}
# With the parallel residual, the norm the MLP reads (StableLM: the attention's own; NeoX
# keeps post_attention_layernorm, applied to the block's input).
_PARALLEL_MLP_NORM = {"stablelm": "input_layernorm"}


def family_names() -> tuple[str, ...]:
    """The ``model_type`` of every family in the table."""
    return tuple(_FAMILIES)


def adapter_for(model: Any, adapter: Adapter | None = None, *, check: bool = True) -> Adapter:
    """The adapter of a model (an ``ii.Model`` or a Hugging Face causal LM), the family's or
    ``adapter`` (one by hand); either is checked on one small forward of this model the first
    time (:mod:`ipy_intervene.arch.check`: a map whose sites would be wrong is a SiteError)."""
    module = getattr(model, "module", model)
    if adapter is not None:
        found = adapter.with_layers(module) if not adapter.n_layers else adapter
    else:
        found = _family_adapter(module)
    if not check:
        return found
    from ipy_intervene.arch.check import checked

    return checked(module, found)


def _family_adapter(module: Any) -> Adapter:
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    family = _FAMILIES.get(model_type)
    if family is None:
        raise SiteError(
            f"sweeps do not know the architecture {model_type or type(module).__name__!r}; "
            f"supported: {', '.join(_FAMILIES)}. Pass the module paths by hand: "
            "adapter=ii.Adapter(name, blocks=..., final_norm=..., unembed=..., embed=..., "
            "attn=..., mlp=..., mid_norm=..., head_proj=..., n_heads=...)")
    fields = dict(family)
    flag = _PARALLEL.get(model_type)
    if flag is not None and getattr(config, flag, False):
        fields["mid_norm"] = None
        fields["mlp_norm"] = _PARALLEL_MLP_NORM.get(model_type, fields["mlp_norm"])
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    return Adapter(model_type, n_heads=int(heads), **fields).with_layers(module)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[..., n_heads * d_head]`` -> ``[..., n_heads, d_head]`` (a view)."""
    return x.view(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
