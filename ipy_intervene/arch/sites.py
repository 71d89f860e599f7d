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
                   mid_norm="post_attention_layernorm", head_proj="self_attn.o_proj")

# Every family here has blocks whose attention and MLP outputs are added to the residual
# stream as they are (no multiplier, no norm after them), embeddings that reach block 0
# unscaled and logits that are the unembedding of the final norm; the self-check
# (:mod:`ipy_intervene.arch.check`) proves it on each model's first analysis. MoE families
# (mixtral, qwen2_moe, qwen3_moe): `mlp` is the sparse MoE block (its output, shared expert
# included, is mlp_out). Families with a parallel residual have mid_norm=None (GPT-J always;
# GPT-NeoX and StableLM when their config's flag in _PARALLEL is set).
_FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": dict(blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head",
                 embed="transformer.wte", attn="attn", mlp="mlp", mid_norm="ln_2",
                 head_proj="attn.c_proj"),
    "gpt_neox": dict(blocks="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
                     unembed="lm_head", embed="gpt_neox.embed_in", attn="attention", mlp="mlp",
                     mid_norm="post_attention_layernorm", head_proj="attention.dense"),
    **{name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3")},
    "gptj": dict(blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head",
                 embed="transformer.wte", attn="attn", mlp="mlp", mid_norm=None,
                 head_proj="attn.out_proj"),
    **{name: _LLAMA_LIKE for name in ("mixtral", "phi3", "olmo", "stablelm", "qwen2_moe",
                                      "qwen3_moe", "smollm3")},
}
_PARALLEL = {"gpt_neox": "use_parallel_residual", "stablelm": "use_parallel_residual"}


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
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    return Adapter(model_type, n_heads=int(heads), **fields).with_layers(module)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[..., n_heads * d_head]`` -> ``[..., n_heads, d_head]`` (a view)."""
    return x.view(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
