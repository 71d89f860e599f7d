"""Sites inside attention: each head's ``q``, ``k``, ``v``, ``pattern``, ``z`` and ``result``, on every
model whose attention goes through transformers' attention interface (GPT-2, GPT-NeoX/Pythia,
Llama, Mistral, Qwen2, ...), whatever implementation it was loaded with, and on the families
whose attention computes its scores in a method of its own (:data:`OWN_ATTENTION`: GPT-Neo's
``_attn``, which does not scale by 1/sqrt(d)): the hook points wrap that method, so every
site is the model's own computation.

``model.transformer.h[3].attn.pattern`` is a site like any module: ``.output`` reads it,
assigning or editing it in place changes the forward. Shapes (transformers' own layout)::

    q        [batch, head, query, d_head]     after rotary embeddings, where the model has them
    k, v     [batch, kv_head, key, d_head]    GQA: query head h reads kv head h // (head / kv_head)
    pattern  [batch, head, query, key]        softmax probabilities
    z        [batch, query, head, d_head]     each head's mix of values (the out-projection's input)
    result   [batch, query, head, d_model]    what each head writes into the residual stream
                                              through the out-projection (its bias not included)

Patterns exist only in eager attention, so a forward whose cell uses one of these sites runs
the model's own eager attention function, through :func:`attention_with_sites`, registered in
transformers as ``"ii_eager"``; eager and SDPA agree to float precision, and the other sites
of that forward are the eager model's. A changed pattern mixes the values again, exactly as
eager attention does after its softmax. ``result`` is computed only when a cell uses it; a
changed ``result`` adds its change, summed over heads, to the out-projection's output (so
the positions and heads left alone keep their exact values).

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> point(model.module.transformer.h[0].attn, "pattern")
HookPoint(pattern)
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Callable

import torch
from torch import nn

from ipy_intervene.arch.adapter import get_path
from ipy_intervene.errors import SiteError

ATTENTION_SITES = ("q", "k", "v", "pattern", "z", "result")
OUT_PROJECTIONS = ("c_proj", "o_proj", "dense", "out_proj")
KEY = "ii_eager"

_points: "weakref.WeakKeyDictionary[nn.Module, dict[str, HookPoint]]" = (
    weakref.WeakKeyDictionary())
_result_change: "weakref.WeakKeyDictionary[nn.Module, torch.Tensor]" = (
    weakref.WeakKeyDictionary())  # out-projection -> what a changed `result` adds to it


class HookPoint(nn.Module):
    """A value inside attention, as a module that returns its input: hooks on it read and
    change the value. Not a child of the attention module (the model's state is unchanged)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return self.name


# Attention classes that compute q/k/v -> (z, pattern) in a method of their own, not through
# transformers' interface: class name -> the method, called as method(query, key, value,
# attention_mask) with q/k/v [batch, head, pos, d_head], returning (z [batch, head, query,
# d_head], pattern). GPT-Neo (GPTNeoSelfAttention._attn: q k^T unscaled, its causal or
# local-window mask, the attention mask, softmax, pattern @ v).
OWN_ATTENTION = {"GPTNeoSelfAttention": "_attn"}
# Modules that only hold such an attention and call it (GPT-Neo's GPTNeoAttention): the sites
# of the attention they hold, so the family's `attn` path reaches them.
HOLDERS = {"GPTNeoAttention": "attention"}


def is_attention(module: nn.Module) -> bool:
    """An attention module that calls transformers' attention interface with itself, or one
    of :data:`OWN_ATTENTION` (or a holder of one)."""
    module = _held(module)
    if _own_method(module) is not None:
        return True
    module_of = sys.modules.get(type(module).__module__)
    return (type(module).__name__.endswith("Attention") and hasattr(module, "config")
            and hasattr(module_of, "eager_attention_forward"))


def _held(module: nn.Module) -> nn.Module:
    """The attention a holder (:data:`HOLDERS`) holds; else ``module``."""
    inner = getattr(module, HOLDERS.get(type(module).__name__, ""), None) \
        if type(module).__name__ in HOLDERS else None
    return inner if isinstance(inner, nn.Module) and _own_method(inner) else module


def _own_method(module: nn.Module) -> str | None:
    name = OWN_ATTENTION.get(type(module).__name__)
    return name if name is not None and callable(getattr(type(module), name, None)) else None


def site_point(root: nn.Module, adapter: Any, layer: int, name: str) -> HookPoint:
    """The hook point ``name`` (q, k, v, pattern, z) of block ``layer``'s attention under the
    map ``adapter``; a SiteError naming the family where its attention has none."""
    attn = get_path(adapter.block(root, layer), adapter.attn)
    found = point(attn, name)
    if found is None:
        raise SiteError(f"the {adapter.name} family's attention ({type(attn).__name__}) does "
                        "not go through transformers' attention interface, where the q, k, v "
                        f"and pattern sites live; so `{name}` cannot be read or patched here. "
                        "Its heads' outputs can: `head_out` (the out-projection's input)")
    return found


def point(module: nn.Module, name: str) -> HookPoint | None:
    """The hook point ``name`` of an attention module (None for other modules or names)."""
    if name not in ATTENTION_SITES or not is_attention(module):
        return None
    module = _held(module)
    table = _points.get(module)
    if table is None:
        table = _points[module] = {n: HookPoint(n) for n in ATTENTION_SITES}
    return table[name]


def owner(module: nn.Module) -> nn.Module | None:
    """The attention module a hook point belongs to."""
    for attention, table in _points.items():
        if module in table.values():
            return attention
    return None


def register() -> None:
    """Make ``"ii_eager"`` an attention implementation transformers knows (once)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(KEY, attention_with_sites)
    AttentionMaskInterface.register(KEY, eager_mask)


def use_sites(session: Any, model: nn.Module) -> None:
    """For the ``session`` (a :class:`~ipy_intervene.infra.hooks.HookSession`), ``model``'s
    attention is its own eager function with a hook point at each site."""
    register()
    for config in configs(model):
        session.set_attr(config, "_attn_implementation", KEY)
    for module in model.modules():
        if module is not _held(module):
            continue                                  # a holder: its attention is listed too
        proj = out_projection(module) if is_attention(module) else None
        if proj is not None:
            session.post(proj, _add_result_change)
        method = _own_method(module)
        if method is not None:
            session.set_attr(module, method, _own_with_sites(module, getattr(module, method)))


def _own_with_sites(module: nn.Module, own: Callable) -> Callable:
    """``own`` (an :data:`OWN_ATTENTION` method, bound) with a hook point at each site: the
    same order as :func:`attention_with_sites`, z as ``[batch, query, head, d_head]``."""
    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        table = _points.get(module)
        if table is None:
            return own(query, key, value, attention_mask)
        query, key, value = table["q"](query), table["k"](key), table["v"](value)
        z, pattern = own(query, key, value, attention_mask)
        version = pattern._version
        changed = table["pattern"](pattern)
        z = z.transpose(1, 2)
        if changed is not pattern or pattern._version != version:
            z = mix(changed, value)
        z = table["z"](z)
        if _used(table["result"]):
            _head_results(module, table["result"], z)
        return z.transpose(1, 2), changed
    return attend


def attention_with_sites(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own eager attention, with a hook point at each site."""
    eager: Callable = sys.modules[type(module).__module__].eager_attention_forward
    table = _points.get(module)
    if table is None:
        return eager(module, query, key, value, attention_mask, **kwargs)
    query, key, value = table["q"](query), table["k"](key), table["v"](value)
    z, pattern = eager(module, query, key, value, attention_mask, **kwargs)
    version = pattern._version
    changed = table["pattern"](pattern)
    if changed is not pattern or pattern._version != version:
        z = mix(changed, value)
    z = table["z"](z)
    if _used(table["result"]):
        _head_results(module, table["result"], z)
    return z, changed


def _used(point: HookPoint) -> bool:
    return bool(point._forward_hooks or point._forward_pre_hooks)


def _head_results(module: nn.Module, point: HookPoint, z: torch.Tensor) -> None:
    """Run ``result`` through its hook point; remember the change a hook made to it."""
    proj = out_projection(module)
    if proj is None or proj.weight.is_meta:
        raise SiteError(f"`result` needs the out-projection weights of {type(module).__name__} "
                        f"(a child named one of {', '.join(OUT_PROJECTIONS)}, in memory: not "
                        "offloaded); read `z` and apply the projection yourself")
    result = head_results(proj, z)
    version = result._version
    seen = result.clone()
    changed = point(result)
    if changed is not result or result._version != version:
        _result_change[proj] = (changed - seen).sum(2)


def _add_result_change(proj: nn.Module, args: Any, output: torch.Tensor) -> Any:
    change = _result_change.pop(proj, None)
    return None if change is None else output + change.to(output.dtype)


def out_projection(module: nn.Module) -> nn.Module | None:
    """The attention module's out-projection (``c_proj``, ``o_proj``, ``dense``, ...)."""
    for name in OUT_PROJECTIONS:
        proj = getattr(module, name, None)
        if isinstance(proj, nn.Module):
            return proj
    return None


def head_results(proj: nn.Module, z: torch.Tensor,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Each head's write through the out-projection, without its bias: ``z [batch, query,
    head, d_head]`` -> ``[batch, query, head, d_model]``, in ``dtype`` (default: the
    weights'). Linear and GPT-2's Conv1D."""
    weight = proj.weight if dtype is None else proj.weight.to(dtype)
    if type(proj).__name__ == "Conv1D":
        weight = weight.T                                   # Conv1D keeps [in, out]
    elif not isinstance(proj, nn.Linear):
        raise SiteError(f"`result` reads nn.Linear and Conv1D out-projections, not "
                        f"{type(proj).__name__}; read `z` and apply the projection yourself")
    per_head = weight.view(weight.shape[0], z.shape[2], z.shape[3])   # [d_model, head, d_head]
    return torch.einsum("bqhd,ohd->bqho", z.to(weight.dtype), per_head)


def mix(pattern: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``z`` from a pattern, as eager attention computes it after the softmax (dropout off):
    ``[batch, head, query, key] @ [batch, kv_head, key, d_head]`` -> ``[batch, query, head,
    d_head]``."""
    repeat = pattern.shape[1] // value.shape[1]
    if repeat > 1:  # GQA: each kv head serves `repeat` query heads
        b, kv, s, d = value.shape
        value = value[:, :, None].expand(b, kv, repeat, s, d).reshape(b, kv * repeat, s, d)
    return torch.matmul(pattern.to(value.dtype), value).transpose(1, 2).contiguous()


def configs(model: nn.Module) -> list[Any]:
    """The distinct configs whose ``_attn_implementation`` the model's attention reads."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and is_attention(module):
            seen.setdefault(id(config), config)
    top = getattr(model, "config", None)
    if top is not None:
        seen.setdefault(id(top), top)
    return list(seen.values())
