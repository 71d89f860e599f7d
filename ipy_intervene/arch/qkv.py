"""How attention reads the residual stream, per head: the facts edge attribution needs.

From an :class:`~ipy_intervene.arch.sites.Adapter` (the family's or one by hand) and the
model, :func:`attention_layout` gives the norm attention reads through, the norm the MLP reads
through, the out-projection, the head counts and, for each head's ``q`` and each kv head's
``k`` and ``v``, the output columns of the projection that computes it. Nothing is guessed:
the layout is the adapter's ``qkv`` / ``qkv_layout`` (stated from transformers' modeling
files for the table's families), the head size is the out-projection's input width over
``n_heads``, the kv heads follow from the projections' widths, and a projection whose width
does not fit the layout is a :class:`SiteError` naming the family and the width.

What each sublayer writes into the stream is the module the block adds (``Adapter.writer``):
attention's out-projection, whose input splits into one linear write per head
(``head_senders``), or, under a post-norm (Gemma 2/3, OLMo 2/3), that norm's output, which
is not a sum over heads, so attention's whole write is one sender. A map with no pre-norms
(OLMo 2/3: attention and the MLP read the stream itself) has ``attn_norm`` equal to ``attn``
and ``mlp_norm`` equal to ``mlp``: the "norm" there is the identity (``attn_normed`` /
``mlp_normed`` are False), and the circuit runs prove on the model's forward that the
projections read attention's own input.

>>> import ipy_intervene as ii
>>> from ipy_intervene.arch.sites import adapter_for
>>> model = ii.load_model("demo")
>>> layout = attention_layout(model.module, adapter_for(model))
>>> layout.n_heads, layout.n_kv, layout.head_dim, layout.parallel
(4, 4, 32, False)
>>> layout.columns[5]
HeadColumns(path='attn.c_attn', role='k', index=1, start=160, stop=192)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from torch import nn

from ipy_intervene.arch.sites import Adapter, get_path
from ipy_intervene.errors import SiteError

QKV_LAYOUTS = ("separate", "blocks", "per_head")


@dataclass(frozen=True)
class HeadColumns:
    """Output columns ``start:stop`` of the projection at ``path`` (inside a block) that
    compute input ``role`` (``q``, ``k`` or ``v``) of head ``index`` (a kv head for k, v)."""

    path: str
    role: str
    index: int
    start: int
    stop: int


@dataclass(frozen=True)
class AttentionLayout:
    """Paths inside a block, and the per-head columns of the q/k/v projections (every q
    head in order, then every kv head's k, then every kv head's v)."""

    attn_norm: str
    mlp_norm: str
    out_proj: str
    parallel: bool
    n_heads: int
    n_kv: int
    head_dim: int
    columns: tuple[HeadColumns, ...]
    attn: str = "attn"          # the attention module (attn_norm == attn: no pre-norm)
    mlp: str = "mlp"            # the MLP (mlp_norm == mlp: no pre-norm)
    attn_writer: str = "attn"   # what the block adds for attention: a post-norm or attn
    mlp_writer: str = "mlp"
    head_senders: bool = True   # attention's write is a sum of one linear write per head

    @property
    def attn_normed(self) -> bool:
        """Attention reads the stream through a norm (False: OLMo 2/3 read it as it is)."""
        return self.attn_norm != self.attn

    @property
    def mlp_normed(self) -> bool:
        """The MLP reads the stream through a norm (False: OLMo 2/3 read it as it is)."""
        return self.mlp_norm != self.mlp

    @property
    def shared_norm(self) -> bool:
        """Attention and the MLP read the block's input through the same norm (GPT-J)."""
        return self.mlp_norm == self.attn_norm


def attention_layout(root: nn.Module, adapter: Adapter) -> AttentionLayout:
    """The layout of ``root``'s attention under ``adapter`` (see the module docstring); a
    :class:`SiteError` naming what is missing or does not fit, or why edge attribution has no
    meaning on the map (a post-norm; a residual or embedding multiplier)."""
    _linear(adapter)
    mlp_norm = adapter.mlp_norm or adapter.mid_norm
    attn_norm = adapter.attn_norm
    if attn_norm is None and mlp_norm == adapter.mlp and adapter.post_attn_norm is not None:
        attn_norm = adapter.attn    # no pre-norms (OLMo 2/3): attention reads the stream
    missing = [name for name, v in (("attn_norm", attn_norm), ("qkv", adapter.qkv))
               if v is None]
    if mlp_norm is None:
        missing.append("mlp_norm")
    if missing:
        raise SiteError(
            f"edge attribution needs, for the {adapter.name!r} map, how attention and the MLP "
            f"read the residual stream; missing: {', '.join(missing)}. Add them to the "
            "adapter (paths inside a block): ii.Adapter(..., attn_norm='<norm before "
            "attention>', mlp_norm='<norm before the MLP>', qkv=('<q proj>', '<k proj>', "
            "'<v proj>')) or qkv=('<fused proj>',) with qkv_layout='blocks' or 'per_head' "
            "(see help(ii.Adapter))")
    layout = adapter.qkv_layout
    if layout not in QKV_LAYOUTS or (len(adapter.qkv) == 3) != (layout == "separate") \
            or len(adapter.qkv) not in (1, 3):
        raise SiteError(
            f"the {adapter.name!r} map's qkv={adapter.qkv!r} with qkv_layout={layout!r} does "
            "not say how the q/k/v columns split into heads: give three projections with "
            "qkv_layout='separate', or one with qkv_layout='blocks' ([q heads | k kv heads | "
            "v kv heads]) or 'per_head' (each head's [q | k | v])")
    block = get_path(root, adapter.blocks)[0]
    paths = {"attn_norm": attn_norm, "mlp_norm": mlp_norm, "head_proj": adapter.head_proj,
             "post_attn_norm": adapter.writer("attn"), "post_mlp_norm": adapter.writer("mlp"),
             **{f"qkv[{i}]": p for i, p in enumerate(adapter.qkv)}}
    for name, path in paths.items():
        try:
            get_path(block, path)
        except AttributeError:
            raise SiteError(f"the {adapter.name!r} map's {name}={path!r} is not a module of "
                            f"{adapter.blocks}[0]") from None
    n_heads = adapter.n_heads
    d_in = _width(get_path(block, adapter.head_proj), adapter, "head_proj", out=False)
    if d_in % n_heads:
        raise SiteError(f"the {adapter.name!r} out-projection {adapter.head_proj} reads "
                        f"{d_in} columns, not a multiple of its {n_heads} heads")
    d = d_in // n_heads
    widths = [_width(get_path(block, p), adapter, p) for p in adapter.qkv]
    n_kv = _kv_heads(adapter, layout, widths, n_heads, d)
    return AttentionLayout(attn_norm, mlp_norm, adapter.head_proj,
                           adapter.mid_norm is None, n_heads, n_kv, d,
                           _columns(adapter.qkv, layout, n_heads, n_kv, d), adapter.attn,
                           adapter.mlp, adapter.writer("attn"), adapter.writer("mlp"),
                           adapter.post_attn_norm is None)


def _linear(adapter: Adapter) -> None:
    """Edge attribution sums each sender's write (a head's z through its out-projection slice,
    or a whole sublayer's write under a post-norm) into each receiver's input: a write the
    block adds outside the sublayers, or an unnamed factor on the way, makes that wrong."""
    reason = adapter.unsummed("edge attribution")
    in_place = dict(adapter.refused).get("mlp_out")
    if reason is None and in_place is not None:
        reason = (f"edge attribution reads each MLP's write into the residual stream (mlp_out), "
                  f"which a {adapter.name} model does not have as a value of its own: "
                  f"{in_place}")
    if reason is None and (adapter.residual_multiplier != 1 or adapter.embed_scale != 1):
        reason = (f"edge attribution reads each sender's write into the residual stream as its "
                  f"module's output, but {adapter.name} scales what it adds "
                  f"(residual_multiplier={adapter.residual_multiplier:g}, embed_scale="
                  f"{adapter.embed_scale:g}), so every edge score would be off by that factor")
    if reason is not None:
        raise SiteError(reason)


def _width(module: nn.Module, adapter: Adapter, path: str, out: bool = True) -> int:
    """Output (or input) width of an nn.Linear or a Conv1D (GPT-2's, weight ``[in, out]``)."""
    weight = getattr(module, "weight", None)
    conv = type(module).__name__ == "Conv1D"
    if weight is None or weight.dim() != 2 or not (conv or isinstance(module, nn.Linear)):
        raise SiteError(f"the {adapter.name!r} map's {path} is a {type(module).__name__}; "
                        "edge attribution computes each head's columns of an nn.Linear or "
                        "Conv1D projection only")
    rows, cols = weight.shape[::-1] if conv else weight.shape
    return int(rows if out else cols)


def _kv_heads(adapter: Adapter, layout: str, widths: list[int], n_heads: int, d: int) -> int:
    """The kv heads the projections' widths imply; an error where they do not fit."""
    fits, n_kv = False, 0
    if layout == "separate":
        q, k, v = widths
        n_kv = k // d
        fits = q == n_heads * d and k == v and k % d == 0
    elif layout == "blocks":
        rest = widths[0] - n_heads * d
        n_kv = rest // (2 * d)
        fits = rest > 0 and rest % (2 * d) == 0
    else:
        n_kv = n_heads
        fits = widths[0] == 3 * n_heads * d
    if not fits or n_kv < 1 or n_heads % n_kv:
        raise SiteError(f"the {adapter.name!r} q/k/v projection widths {widths} do not fit "
                        f"qkv_layout={layout!r} with {n_heads} heads of size {d} (the "
                        "out-projection's input over n_heads); edge attribution does not "
                        "guess another split")
    return n_kv


def _columns(paths: tuple[str, ...], layout: str, h: int, kv: int,
             d: int) -> tuple[HeadColumns, ...]:
    heads = [("q", i) for i in range(h)] + [(t, g) for t in "kv" for g in range(kv)]
    out = []
    for role, i in heads:
        if layout == "separate":
            path, start = paths["qkv".index(role)], i * d
        elif layout == "blocks":
            offset = {"q": 0, "k": h * d, "v": h * d + kv * d}[role]
            path, start = paths[0], offset + i * d
        else:
            path, start = paths[0], 3 * d * i + "qkv".index(role) * d
        out.append(HeadColumns(path, role, i, start, start + d))
    return tuple(out)



_values_checked: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def check_values(root: nn.Module, adapter: Adapter, layout: AttentionLayout) -> None:
    """Prove the stated split on one forward (once per model and map): each kv head's ``v``
    columns of the projection at block 0 equal the value vectors the model's attention
    reads (its ``v`` site). A wrong ``qkv_layout`` (``"blocks"`` for a per-head fused
    projection) is a :class:`SiteError`, not silently wrong scores. q and k share the
    layout's convention but go through rotary, so v is what is compared. A family whose
    attention does not run through transformers' attention functions has no ``v`` site:
    its split stays as stated."""
    seen = _values_checked.setdefault(root, set())
    if adapter in seen:
        return
    import torch

    from ipy_intervene.arch import attention
    from ipy_intervene.infra.hooks import HookSession, entry_point

    block = get_path(root, adapter.blocks)[0]
    attn = get_path(block, adapter.attn)
    outputs: dict[str, torch.Tensor] = {}
    values: list[torch.Tensor] = []
    vocab = root.get_input_embeddings().num_embeddings

    @entry_point
    def run() -> None:
        with torch.no_grad(), HookSession() as session:
            attention.use_sites(session, root)
            for path in adapter.qkv:
                session.post(get_path(block, path),
                             lambda m, a, out, path=path: outputs.setdefault(path, out.detach()))
            point = attention.point(attn, "v")
            if point is not None:
                session.post(point, lambda m, a, out: values.append(out.detach()))
            ids = torch.arange(6, device=next(root.parameters()).device).view(1, 6) % vocab
            root.forward(input_ids=ids)

    run()
    if values:
        _compare_values(adapter, layout, outputs, values[0])
    seen.add(adapter)


def _compare_values(adapter: Adapter, layout: AttentionLayout, outputs: dict,
                    value: "torch.Tensor") -> None:
    import torch

    for col in (c for c in layout.columns if c.role == "v"):
        mine = outputs[col.path][..., col.start:col.stop]            # [batch, pos, d_head]
        theirs = value[:, col.index]                                   # [batch, pos, d_head]
        if mine.shape != theirs.shape or not torch.allclose(mine, theirs, atol=1e-5,
                                                            rtol=1e-4):
            raise SiteError(
                f"the {adapter.name!r} map's qkv={adapter.qkv!r} with "
                f"qkv_layout={adapter.qkv_layout!r} does not give the model's values: kv head "
                f"{col.index}'s v columns {col.start}:{col.stop} differ from what its "
                "attention reads. Check qkv_layout ('blocks': [q heads | k kv heads | v kv "
                "heads]; 'per_head': each head's [q | k | v]) and the projection paths")
