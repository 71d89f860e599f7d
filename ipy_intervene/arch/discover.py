"""Discovery: the site map of a family the table lacks, read off its module tree and config,
then proven by the self-check (:mod:`ipy_intervene.arch.check`).

What it looks for: the blocks (the ``ModuleList`` as long as the config's layer count), the
embedding and unembedding (``get_input_embeddings`` / ``get_output_embeddings``), the final
norm (a norm beside the blocks), in block 0 the attention (a child whose class says
``Attention``), the MLP (``mlp``/``feed_forward``/``ffn``, or a class saying ``MLP``/``MoE``),
the out-projection inside attention (``o_proj``/``out_proj``/``dense``/``c_proj``) and the
block's norms; from the config, the multipliers and logit transforms transformers' families
name there (``embedding_multiplier``, ``residual_multiplier``, ``logit_scale``,
``logits_scaling``, ``final_logit_softcapping``). The norms' roles are not guessed from their names alone: each candidate
arrangement (a pre-MLP norm, a parallel residual, post-norms) is checked on a forward, and
the first one that passes is the map. None passes: a SiteError with what was found and the
``ii.Adapter(...)`` line to complete by hand.

>>> discovered(hf_model).name                                       # doctest: +SKIP
'llama'
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator

from torch import nn

from ipy_intervene.arch.adapter import Adapter, finite
from ipy_intervene.arch.check import adapter_line, checked
from ipy_intervene.arch.families import FAMILIES, n_heads
from ipy_intervene.errors import SiteError

_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo")
_found: "weakref.WeakKeyDictionary[nn.Module, Adapter]" = weakref.WeakKeyDictionary()


def discovered(module: nn.Module) -> Adapter:
    """The checked map of ``module``, discovered (once per model); a SiteError when the
    structure is not recognisable or no arrangement passes the check."""
    known = _found.get(module)
    if known is not None:
        return known
    candidates = list(_candidates(module))
    problems = []
    for adapter in candidates:
        try:
            found = checked(module, adapter)
        except SiteError as error:
            problems.append(str(error).split(": ", 1)[-1].split(". No analysis")[0])
            continue
        _found[module] = found
        return found
    model_type = getattr(getattr(module, "config", None), "model_type", None) \
        or type(module).__name__
    if not candidates:
        raise SiteError(
            f"the architecture {model_type!r} is not in the family table ({', '.join(FAMILIES)}) "
            f"and its module tree is not recognisable ({_missing(module)}). Pass the module "
            "paths by hand: adapter=ii.Adapter(name, blocks=..., final_norm=..., "
            "unembed=..., embed=..., attn=..., mlp=..., mid_norm=..., head_proj=..., "
            "n_heads=...) (or set it once: model.adapter = ii.Adapter(...))")
    raise SiteError(
        f"the architecture {model_type!r} is not in the family table; the map read off its "
        f"module tree fails its check on this model ({problems[0]}). Edit this line and pass "
        f"it as adapter= (or set model.adapter): {adapter_line(candidates[0])}")


def _candidates(module: nn.Module) -> Iterator[Adapter]:
    """Maps that fit the module tree, most likely first (unchecked)."""
    parts = _parts(module)
    if parts is None:
        return
    base, norms, block = parts
    later = norms[1:]
    mlp_like = lambda n: any(k in n for k in ("feed", "ff", "mlp"))  # noqa: E731
    post_attn = [n for n in norms if "post" in n and "att" in n]
    post_mlp = [n for n in norms if "post" in n and mlp_like(n)]
    pre_mlp = [n for n in norms if "pre" in n and mlp_like(n)]
    if post_attn and post_mlp:                           # post-norms (Gemma 2, OLMo 2)
        mid = pre_mlp[0] if pre_mlp else base["mlp"]
        first = [n for n in norms if n not in (post_attn[0], post_mlp[0], *pre_mlp)]
        yield Adapter(**base, mid_norm=mid, attn_norm=first[0] if first else None,
                      mlp_norm=pre_mlp[0] if pre_mlp else None,
                      post_attn_norm=post_attn[0], post_mlp_norm=post_mlp[0])
    for norm in later:                                   # a pre-MLP norm (Llama, GPT-2)
        yield Adapter(**base, mid_norm=norm, attn_norm=norms[0], mlp_norm=norm)
    for norm in norms[:2]:                               # a parallel residual (GPT-J)
        yield Adapter(**base, mid_norm=None, attn_norm=norms[0], mlp_norm=norm)


def _parts(module: nn.Module) -> tuple[dict[str, Any], list[str], nn.Module] | None:
    """The common fields, the block's norm paths (in definition order) and block 0."""
    top = getattr(module, "config", None)
    config = _text_config(top)
    names = {id(m): n for n, m in module.named_modules()}
    blocks_path = _blocks(module, config)
    embed, unembed = _io(module, names)
    if blocks_path is None or embed is None or unembed is None:
        return None
    blocks = module.get_submodule(blocks_path)
    block = blocks[0]
    attn = next((n for n, m in block.named_children() if "attention" in type(m).__name__.lower()),
                None)
    mlp = next((n for n, m in block.named_children() if n in _MLP_NAMES), None) or next(
        (n for n, m in block.named_children()
         if any(k in type(m).__name__.lower() for k in ("mlp", "moe", "feedforward"))), None)
    final = _final_norm(module, blocks_path)
    if attn is None or mlp is None or final is None:
        return None
    inner = [n for n, _ in block.get_submodule(attn).named_modules()]
    proj = next((n for n in inner if n.rsplit(".", 1)[-1] in _OUT_NAMES), None)
    if proj is None:
        return None
    where = proj.rsplit(".", 1)[0] + "." if "." in proj else ""    # GPT-Neo: attn.attention
    try:
        heads = n_heads(config)
    except AttributeError:
        return None
    norms = [n for n, m in block.named_children() if _is_norm(m)]
    qkv = tuple(f"{attn}.{where}{p}_proj" for p in "qkv")
    has_qkv = all(n in inner for n in (f"{where}{p}_proj" for p in "qkv"))
    base = dict(name=getattr(top, "model_type", None) or type(module).__name__,
                blocks=blocks_path, final_norm=final, unembed=unembed, embed=embed, attn=attn, mlp=mlp, head_proj=f"{attn}.{proj}",
                n_heads=heads, n_layers=len(blocks),
                qkv=qkv if has_qkv else None, qkv_layout="separate" if has_qkv else None,
                **_from_config(config))
    return base, norms, block


def _text_config(config: Any) -> Any:
    """The language model's config (a multimodal model keeps it in ``text_config``)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _from_config(config: Any) -> dict[str, Any]:
    """The multipliers and logit transforms a config states (the self-check proves them)."""
    number = lambda name: getattr(config, name, None) if isinstance(  # noqa: E731
        getattr(config, name, None), (int, float)) and not isinstance(
        getattr(config, name, None), bool) else None
    fields: dict[str, Any] = {}
    if number("embedding_multiplier") is not None:
        fields["embed_scale"] = finite(number("embedding_multiplier"))
    if number("residual_multiplier") is not None:
        fields["residual_multiplier"] = finite(number("residual_multiplier"))
    if number("logit_scale") is not None:
        fields["logit_scale"] = finite(number("logit_scale"))
    elif number("logits_scaling") is not None:
        fields["logit_scale"] = 1.0 / finite(number("logits_scaling"))
    if number("final_logit_softcapping") is not None:
        fields["logit_softcap"] = float(number("final_logit_softcapping"))
    return fields


def _blocks(module: nn.Module, config: Any) -> str | None:
    """The path of the ModuleList as long as the config's layer count (the shortest path)."""
    count = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                  if isinstance(getattr(config, k, None), int)), None)
    lists = [n for n, m in module.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == count and count]
    return min(lists, key=lambda n: n.count("."), default=None)


def _io(module: nn.Module, names: dict[int, str]) -> tuple[str | None, str | None]:
    try:
        embed, unembed = module.get_input_embeddings(), module.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    return names.get(id(embed)), names.get(id(unembed))


def _final_norm(module: nn.Module, blocks_path: str) -> str | None:
    """A norm beside the blocks (a child of their parent), the last one defined."""
    parent = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    owner = module.get_submodule(parent) if parent else module
    found = [n for n, m in owner.named_children() if _is_norm(m)]
    return f"{parent}.{found[-1]}".lstrip(".") if found else None


def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower()


def _missing(module: nn.Module) -> str:
    """What discovery did not find, in words."""
    config = _text_config(getattr(module, "config", None))
    path = _blocks(module, config)
    if path is None:
        return "no ModuleList as long as the config's num_hidden_layers"
    kinds = {tuple(n for n, _ in b.named_children()) for b in module.get_submodule(path)}
    if len(kinds) > 1:
        return (f"its blocks differ ({' / '.join(', '.join(k) for k in sorted(kinds))}): a "
                "hybrid model (linear-attention or recurrent layers beside attention layers) "
                "has no single attention path, so attention and head sites cannot be mapped")
    embed, unembed = _io(module, {id(m): n for n, m in module.named_modules()})
    if embed is None or unembed is None:
        return "no input or output embedding module"
    return ("block 0 has no child that is clearly the attention (a class named *Attention*) "
            "with an out-projection (o_proj, out_proj, dense, c_proj), the MLP, or no final "
            "norm beside the blocks")
