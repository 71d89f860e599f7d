"""TransformerLens habits in a cell: its module names, hook points and calls, each answered
with what to write here, on this model's own module paths.

>>> import ipy_intervene as ii
>>> root = ii.load_model("demo").module
>>> tl_hint("hook_resid_pre", "transformer.h[3]", root)
"`hook_resid_pre` is TransformerLens's hook name: here write `model.transformer.h[3].input` (the residual stream entering block 3)"
>>> tl_site("blocks.3.attn.hook_pattern", root)
'model.transformer.h[3].attn.pattern.output'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ipy_intervene.errors import SiteError

# (MLP input projection, MLP output projection) as transformers names them, first match wins;
# read off the model's own MLP (a mixture of experts has none of these: no hook_pre/hook_post)
_MLP_PROJECTIONS = (("gate_proj", "down_proj"), ("c_fc", "c_proj"),
                    ("dense_h_to_4h", "dense_4h_to_h"), ("fc1", "fc2"), ("fc_in", "fc_out"),
                    ("up_proj", "down_proj"), ("w1", "w2"))

# TransformerLens hook name -> (site relative to block {b}, what it is)
_BLOCK = {
    "hook_resid_pre": ("{b}.input", "the residual stream entering block {l}"),
    "hook_resid_post": ("{b}.output", "the residual stream leaving block {l}"),
    "hook_resid_mid": ("{b}.{mid_norm}.input", "the residual stream between attention and MLP"),
    "hook_attn_out": ("{b}.{attn_out}", "what attention adds to the residual stream"),
    "hook_mlp_out": ("{b}.{mlp_out_site}", "what the MLP adds to the residual stream"),
}
_ATTN = {"hook_pattern": "pattern", "hook_z": "z", "hook_q": "q", "hook_k": "k", "hook_v": "v",
         "hook_result": "result"}
_MLP = {
    "hook_pre": ("{b}.{mlp}.{mlp_in}.output", "the MLP's pre-activation"),
    "hook_post": ("{b}.{mlp}.{mlp_out}.input",
                  "the MLP's activations, the input of its output projection"),
}


@dataclass(frozen=True)
class _Paths:
    """This model's module paths, for the answers."""

    blocks: str
    attn: str
    mlp: str
    mid_norm: str | None
    final_norm: str
    embed: str
    unembed: str
    ln1: str | None
    ln2: str | None
    mlp_in: str | None
    mlp_out: str | None
    pos_embed: str | None
    n_layers: int
    attn_out: str | None       # site text of what attention adds (None: no such module)
    mlp_out_site: str | None

    def block(self, layer: Any) -> str:
        return f"{self.blocks}[{layer}]"


def _paths(root: Any) -> _Paths | None:
    from ipy_intervene.arch.sites import adapter_for

    from ipy_intervene.arch.sites import get_path

    try:
        ad = adapter_for(root)
        block = ad.block(getattr(root, "module", root), 0)
    except (SiteError, AttributeError, TypeError, IndexError):
        return None
    mlp = getattr(block, ad.mlp, None)
    mlp_in, mlp_out = next(((a, b) for a, b in _MLP_PROJECTIONS
                            if hasattr(mlp, a) and hasattr(mlp, b)), (None, None))
    parent = ad.embed.rsplit(".", 1)[0] if "." in ad.embed else ""
    pos = next((f"{parent}.{n}".lstrip(".") for n in ("wpe", "embed_positions")
                if _has(root, f"{parent}.{n}".lstrip("."), get_path)), None)
    return _Paths(ad.blocks, ad.attn, ad.mlp, ad.mid_norm, ad.final_norm, ad.embed, ad.unembed,
                  ad.attn_norm, ad.mlp_norm or ad.mid_norm, mlp_in, mlp_out, pos, ad.n_layers,
                  _writes(ad, block, "attn"), _writes(ad, block, "mlp"))


def _has(root: Any, path: str, get_path: Any) -> bool:
    try:
        get_path(getattr(root, "module", root), path)
    except AttributeError:
        return False
    return True


def _writes(ad: Any, block: Any, part: str) -> str | None:
    """The site (after the block's path) of what ``part`` adds: the post-norm's output, or the
    module's (its first element when it returns a tuple, as attention does); None where no
    module outputs it (a residual multiplier, an in-place add)."""
    try:
        path = ad.site_path(f"{part}_out", 0).split("]", 1)[1].lstrip(".")
    except SiteError:
        return None
    tuple_out = part == "attn" and path == ad.attn
    return f"{path}.output[0]" if tuple_out else f"{path}.output"


def _site(name: str, p: _Paths, layer: Any) -> tuple[str, str] | None:
    """(``model.…`` site, what it is) of TransformerLens hook ``name`` in block ``layer``."""
    fields = dict(b=p.block(layer), l=layer, attn=p.attn, mlp=p.mlp, mid_norm=p.mid_norm,
                  mlp_in=p.mlp_in, mlp_out=p.mlp_out, attn_out=p.attn_out,
                  mlp_out_site=p.mlp_out_site)
    if name == "hook_resid_mid" and p.mid_norm is None:
        return None
    needs = {"hook_attn_out": p.attn_out, "hook_mlp_out": p.mlp_out_site,
             "hook_pre": p.mlp_in, "hook_post": p.mlp_out}
    if name in needs and needs[name] is None:
        return None
    if name in _BLOCK or name in _MLP:
        template, what = _BLOCK.get(name) or _MLP[name]
        return "model." + template.format(**fields), what.format(**fields)
    if name in _ATTN:
        return (f"model.{p.block(layer)}.{p.attn}.{_ATTN[name]}.output",
                f"attention's `{_ATTN[name]}` in block {layer}")
    return None


def _hook(name: str, path: str, p: _Paths) -> str | None:
    """A ``hook_*`` name on the module at ``path``."""
    if name == "hook_embed":
        return f"`hook_embed` is TransformerLens's hook name: here write `model.{p.embed}.output`"
    if name == "hook_pos_embed":
        if p.pos_embed is None:
            return ("`hook_pos_embed` is TransformerLens's hook name; this model has no "
                    "position embedding module (its positions are rotary, applied inside "
                    "attention)")
        return ("`hook_pos_embed` is TransformerLens's hook name: here write "
                f"`model.{p.pos_embed}.output`")
    if name == "hook_attn_scores":
        return ("`hook_attn_scores` (before the softmax) is not a site here; "
                f"`model.{p.block('l')}.{p.attn}.pattern.output` is the pattern after it")
    found = re.fullmatch(re.escape(p.blocks) + r"\[(\d+)\](.*)", path)
    layer = found.group(1) if found else "l"
    if name == "hook_resid_mid" and p.mid_norm is None:
        return ("`hook_resid_mid` does not exist in this model: attention and MLP read the "
                f"same stream (parallel residual); read `model.{p.block(layer)}.input`")
    site = _site(name, p, layer)
    if site is None:
        return None
    where, what = site
    return f"`{name}` is TransformerLens's hook name: here write `{where}` ({what})"


def _root_name(name: str, p: _Paths) -> str | None:
    """Names TransformerLens's HookedTransformer has at its root."""
    block = p.block
    answers = {
        "blocks": f"the blocks are `model.{p.blocks}`; TransformerLens's hook points are "
                  f"sites of its modules: `blocks[l].hook_resid_pre` -> `model.{block('l')}"
                  f".input`, `hook_resid_post` -> `.output`, `hook_attn_out` -> "
                  f"`model.{block('l')}.{p.attn_out}`, `hook_mlp_out` -> "
                  f"`model.{block('l')}.{p.mlp_out_site}`, `attn.hook_pattern` -> "
                  f"`model.{block('l')}.{p.attn}.pattern.output` (also q, k, v, z, result)",
        "cfg": "the config is `model.config` (Hugging Face names: `num_hidden_layers` for "
               "n_layers, `hidden_size` for d_model, `num_attention_heads` for n_heads, "
               "`vocab_size` for d_vocab)",
        "run_with_cache": "a %%trace cell is the run, and every name it binds is kept: "
                          f"`%%trace model PROMPT` then `resid = [model.{block('l')}.output for "
                          f"l in range({p.n_layers})]`; for many prompts, "
                          "`ii.cache(model, prompts, sites=[\"resid_post\", \"pattern\"])`",
        "run_with_hooks": "write the edit in a %%trace cell: `%%trace model PROMPT` then "
                          f"`model.{block(0)}.output[:, -1] = 0` (a hook function is a line "
                          "of the cell)",
        "W_U": f"the unembedding is `model.{p.unembed}.weight.T` ([d_model, vocab])",
        "b_U": f"the unembedding bias is `model.{p.unembed}.bias` (None when it has none)",
        "W_E": f"the token embedding is `model.{p.embed}.weight` ([vocab, d_model])",
        "W_pos": (f"the position embedding is `model.{p.pos_embed}.weight`" if p.pos_embed
                  else "this model has no position embedding matrix (rotary positions)"),
        "unembed": f"the unembedding is `model.{p.unembed}`",
        "embed": f"the token embedding is `model.{p.embed}`",
        "pos_embed": (f"the position embedding is `model.{p.pos_embed}`" if p.pos_embed
                      else "this model has no position embedding module (rotary positions)"),
        "ln_final": f"the final norm is `model.{p.final_norm}`",
        "to_string": "decode with `model.tokenizer.decode(ids)`",
        "to_single_token": "write `model.token_id(word)`",
    }
    for stacked in ("W_Q", "W_K", "W_V", "W_O"):
        answers[stacked] = (f"there are no stacked [layer, head, ...] weights: each layer's "
                            f"are its attention's own, `model.{block('l')}.{p.attn}` (print it "
                            "for the projections' names)")
    for hooks in ("add_hook", "reset_hooks", "hooks", "remove_all_hook_fns", "add_perma_hook"):
        answers[hooks] = ("hooks exist only while a %%trace cell runs, so there is nothing to "
                          "add or reset: write the edit as a line of the cell "
                          f"(`model.{block(0)}.output[:, -1] = 0`)")
    text = answers.get(name)
    return f"`model.{name}` is TransformerLens's: here {text}" if text else None


def _block_child(name: str, path: str, p: _Paths) -> str | None:
    """TransformerLens's names for a block's children (``attn``, ``mlp``, ``ln1``, ``ln2``)."""
    if not re.fullmatch(re.escape(p.blocks) + r"\[\d+\]", path):
        return None
    ours = {"attn": p.attn, "mlp": p.mlp, "ln1": p.ln1, "ln2": p.ln2}.get(name)
    if ours is None or ours == name:
        return None
    return f"`{name}` is TransformerLens's name: here it is `model.{path}.{ours}`"


def tl_hint(name: str, path: str, root: Any) -> str | None:
    """What to write instead of TransformerLens's ``name`` asked of the module at ``path``
    (``""``: the model) of the model ``root``; None when ``name`` is not one of its habits."""
    p = _paths(root)
    if p is None:
        return None
    if name.startswith("hook_"):
        return _hook(name, path, p)
    if path == "":
        return _root_name(name, p)
    return _block_child(name, path, p)


def tl_site(name: str, root: Any) -> str | None:
    """The site here of a TransformerLens activation name (``blocks.3.hook_resid_pre``,
    ``hook_embed``, ``ln_final.hook_normalized``), or None."""
    p = _paths(root)
    if p is None:
        return None
    if name == "hook_embed":
        return f"model.{p.embed}.output"
    if name == "hook_pos_embed":
        return f"model.{p.pos_embed}.output" if p.pos_embed else None
    if name == "ln_final.hook_normalized":
        return f"model.{p.final_norm}.output"
    found = re.fullmatch(r"blocks\.(\d+)\.(?:(?:attn|mlp)\.)?(hook_\w+)", name)
    site = _site(found.group(2), p, found.group(1)) if found else None
    return site[0] if site else None


def act_name_hint(root: Any) -> str:
    """What to write instead of ``utils.get_act_name(...)``."""
    p = _paths(root)
    block = p.block if p is not None else (lambda layer: f"<layers>[{layer}]")
    attn = p.attn if p is not None else "<attention>"
    return ("`utils.get_act_name` is TransformerLens's: here name the site itself: "
            f"get_act_name('resid_pre', 0) -> `model.{block(0)}.input`, 'resid_post' -> "
            f"`model.{block(0)}.output`, 'pattern' -> `model.{block(0)}.{attn}.pattern.output` "
            "(also q, k, v, z, result); in a %%trace cell those are the real tensors")
