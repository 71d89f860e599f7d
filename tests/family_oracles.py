"""Plain-hooks oracles for the families x methods matrix (tests/test_family_matrix.py): each
one runs ONE prompt alone (no padding) with plain PyTorch hooks on the same model, and shares
no code with ipy_intervene's engines.

Where a site lives (the module a hook goes on) is read from the family's checked site map
(``adapter_for``): that map is proven on a forward by ``arch/check.py`` (resid_pre +
attn_out + mlp_out == resid_post, heads recompose attn_out, the lens at the last layer is the
logits), so these oracles check the engines (batching, left padding, positions, chunking,
the attention sites, the arithmetic of each analysis), not the map. Three oracles need no
map at all: the lens (the model's own forward with the later blocks skipped), attention
sites (the model's own eager attention function, patched by hand through transformers'
attention interface) and the trace's block read/write.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ipy_intervene.arch.sites import get_path

from conftest import TinySAE  # noqa: F401  (family_matrix builds its SAEs as o.TinySAE)

CLEAN = [[5, 9, 12, 20, 7, 30, 14], [8, 3, 40, 11], [21, 6, 17, 9, 25]]
CORRUPT = [[5, 9, 13, 20, 7, 31, 14], [8, 4, 40, 11], [21, 6, 18, 9, 25]]
GOOD, BAD = 12, 13
WIDTH = max(len(p) for p in CLEAN)


def ids(prompts):
    """A list of 1-D token-id tensors (the package left-pads them)."""
    return [torch.tensor(p) for p in prompts]


def first(out):
    return out[0] if isinstance(out, tuple) else out


def replace(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def metric(logits):
    return logits[:, -1, GOOD] - logits[:, -1, BAD]


def close(got, want, what):
    """fp32: equal within 1e-5 (absolute, and relative to the value's size)."""
    torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{what}: {m}")


# -- one prompt alone, plain hooks -------------------------------------------------------------


def input_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def with_input(args, kwargs, x):
    return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})


@contextmanager
def hooked(pre=(), post=()):
    """(module, fn) pre-hooks ``fn(x) -> new x or None`` on the first input and post-hooks
    ``fn(out) -> new out or None``; removed on exit."""
    with ExitStack() as stack:
        for module, fn in pre:
            def hook(m, args, kwargs, fn=fn):
                new = fn(input_of(args, kwargs))
                return None if new is None else with_input(args, kwargs, new)
            stack.callback(module.register_forward_pre_hook(hook, with_kwargs=True).remove)
        for module, fn in post:
            stack.callback(module.register_forward_hook(lambda m, a, o, fn=fn: fn(o)).remove)
        yield


def logits_alone(module, prompt, pre=(), post=(), grad=False):
    with hooked(pre, post), torch.set_grad_enabled(grad):
        return module(input_ids=torch.tensor([prompt])).logits


INPUT_SITES = ("resid_pre", "resid_mid", "head_out")


def site_module(module, adapter, site, layer):
    return adapter.module(module, site, layer)


def record(module, adapter, site, prompt):
    """{layer: the site's value [1, seq, d]} of one plain forward."""
    seen, pre, post = {}, [], []
    for layer in range(adapter.n_layers):
        target = site_module(module, adapter, site, layer)
        if site in INPUT_SITES:
            pre.append((target, lambda x, l=layer: seen.__setitem__(l, x.detach().clone())))
        else:
            post.append((target, lambda o, l=layer: seen.__setitem__(
                l, first(o).detach().clone())))
    logits_alone(module, prompt, pre, post)
    return seen


def patched(module, adapter, site, layer, prompt, edit):
    """The metric of ``prompt`` with ``edit(x)`` (in place on a clone) at the site."""
    target = site_module(module, adapter, site, layer)

    def change(x):
        x = x.clone()
        edit(x)
        return x
    if site == "resid_mid":               # the residual stream itself: edit it in place,
        def in_place(x):                  # so the residual add after the MLP sees it too
            edit(x)
        return metric(logits_alone(module, prompt, pre=[(target, in_place)]))[0]
    if site in INPUT_SITES:
        return metric(logits_alone(module, prompt, pre=[(target, change)]))[0]
    return metric(logits_alone(module, prompt, post=[
        (target, lambda o: replace(o, change(first(o))))]))[0]


@torch.no_grad()
def module_sweep(module, adapter, site):
    """[layer, pos, prompt]: clean values patched into the corrupted prompt, one cell a
    forward; a padding position of a shorter prompt leaves it unpatched."""
    out = torch.zeros(adapter.n_layers, WIDTH, len(CLEAN))
    for i, (clean, corrupt) in enumerate(zip(CLEAN, CORRUPT)):
        pad = WIDTH - len(clean)
        source = record(module, adapter, site, clean)
        out[:, :pad, i] = metric(logits_alone(module, corrupt))[0]
        for layer in range(adapter.n_layers):
            for p in range(pad, WIDTH):
                def edit(x, p=p - pad, v=source[layer][0, p - pad]):
                    x[0, p] = v
                out[layer, p, i] = patched(module, adapter, site, layer, corrupt, edit)
    return out


@torch.no_grad()
def head_out_sweep(module, adapter):
    """[layer, head, prompt]: one head's slice of the out-projection's input, all positions."""
    heads = adapter.n_heads
    out = torch.zeros(adapter.n_layers, heads, len(CLEAN))
    for i, (clean, corrupt) in enumerate(zip(CLEAN, CORRUPT)):
        source = record(module, adapter, "head_out", clean)
        for layer in range(adapter.n_layers):
            d = source[layer].shape[-1] // heads
            for h in range(heads):
                def edit(x, h=h, v=source[layer][0, :, h * d:(h + 1) * d]):
                    x[0, :, h * d:(h + 1) * d] = v
                out[layer, h, i] = patched(module, adapter, "head_out", layer, corrupt, edit)
    return out


# -- attention by hand: the model's own eager function, patched --------------------------------

KEY = "family_oracle"


def attention(seen, patch=None):
    def attend(module, q, k, v, mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        layer = module.layer_idx
        edit = (lambda name, x: patch(layer, name, x)) if patch else (lambda name, x: x)
        q, k, v = edit("q", q), edit("k", k), edit("v", v)
        z, pattern = eager(module, q, k, v, mask, **kwargs)
        seen[layer] = dict(q=q, k=k, v=v, pattern=pattern)
        changed = edit("pattern", pattern)
        if changed is not pattern:           # mix the values again, as eager does
            repeat = pattern.shape[1] // v.shape[1]
            z = (changed @ v.repeat_interleave(repeat, 1)).transpose(1, 2)
        return z, pattern
    return attend


def neo_attention(attn, seen, patch=None):
    """GPT-Neo's own ``_attn`` (its class's method: q k^T unscaled, its mask, softmax,
    pattern @ v; q, k, v, z as [batch, head, pos, d]), with the same edits as :func:`attention`."""
    def attend(q, k, v, mask=None):
        layer = attn.layer_id
        edit = (lambda name, x: patch(layer, name, x)) if patch else (lambda name, x: x)
        q, k, v = edit("q", q), edit("k", k), edit("v", v)
        z, pattern = type(attn)._attn(attn, q, k, v, mask)
        seen[layer] = dict(q=q, k=k, v=v, pattern=pattern)
        changed = edit("pattern", pattern)
        if changed is not pattern:
            z = changed @ v
        return z, pattern
    return attend


@contextmanager
def by_hand(module, seen, patch=None):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    own = [m for m in module.modules() if type(m).__name__ == "GPTNeoSelfAttention"]
    if own:                               # its attention is not transformers' interface
        for attn in own:
            attn._attn = neo_attention(attn, seen, patch)
        try:
            yield
        finally:
            for attn in own:
                del attn._attn
        return
    AttentionInterface.register(KEY, attention(seen, patch))
    AttentionMaskInterface.register(KEY, eager_mask)
    before = module.config._attn_implementation
    module.set_attn_implementation(KEY)
    try:
        yield
    finally:
        module.set_attn_implementation(before)


def logits_by_hand(module, prompt, patch=None):
    seen = {}
    with by_hand(module, seen, patch), torch.no_grad():
        logits = module(input_ids=torch.tensor([prompt])).logits
    return logits, seen


def head_site_sweep(module, n_layers, name):
    """[layer, head, prompt]: head (kv head for k/v) ``name`` patched at every position."""
    rows = []
    for clean, corrupt in zip(CLEAN, CORRUPT):
        _, source = logits_by_hand(module, clean)
        n = source[0][name].shape[1]
        grid = torch.zeros(n_layers, n)
        for layer in range(n_layers):
            for h in range(n):
                def patch(l, what, x, layer=layer, h=h):
                    if l != layer or what != name:
                        return x
                    x = x.clone()
                    x[:, h] = source[layer][name][:, h]
                    return x
                grid[layer, h] = metric(logits_by_hand(module, corrupt, patch)[0])[0]
        rows.append(grid)
    return torch.stack(rows, -1)


# -- lens, decomposition, latents, path patching, EAP ------------------------------------------


@torch.no_grad()
def lens_probs(module, adapter, prompt):
    """[layer, pos, vocab]: the model's own forward with every block after ``layer`` skipped
    (it returns its input), so the final norm, unembedding, scales and caps are the model's."""
    blocks = get_path(module, adapter.blocks)
    rows = []
    for layer in range(adapter.n_layers):
        keep = {}
        post = [(b, lambda o, b=b: replace(o, keep[b])) for b in blocks[layer + 1:]]
        pre = [(b, lambda x, b=b: keep.__setitem__(b, x)) for b in blocks[layer + 1:]]
        rows.append(logits_alone(module, prompt, pre, post)[0].float().softmax(-1))
    return torch.stack(rows)


def frozen_norm(norm: nn.Module, x: torch.Tensor):
    """The final norm at the stream ``x`` [d] as a linear map with its scale frozen, found
    without knowing its class: centring is tested (shift invariance), the bias is N(0), and
    N(c) - b rescaled by the ratio of the two scales is the frozen map. Returns (L, bias)."""
    eps = next((float(getattr(norm, n)) for n in ("eps", "variance_epsilon", "epsilon")
                if hasattr(norm, n)), 1e-5)        # OLMo's parameter-free norm: 1e-5 inside
    bias = norm(torch.zeros(1, x.shape[-1]))[0]
    centred = torch.allclose(norm((x + 3.0)[None])[0], norm(x[None])[0], atol=1e-4)

    def scale(v):
        a = v - v.mean() if centred else v
        return (a.pow(2).mean() + eps).sqrt()

    def linear(c):
        return (norm(c[None])[0] - bias) * scale(c) / scale(x)
    return linear, bias


@torch.no_grad()
def decompose_alone(module, adapter, prompt):
    """At the last position: ``heads`` [layer, head] (each head's write: its slice of the
    out-projection's input times its columns; None where a norm follows the out-projection,
    so a head's write is not linear), ``attn`` and ``mlp`` [layer] (what each adds), each
    through the final norm with its scale frozen, read by W_U[GOOD] - W_U[BAD] times the
    model's own logit scale; ``actual``: the model's logit difference, before its soft-cap
    where it has one (the ratio of its logits to the unembedding's output is then not one
    number)."""
    z = record(module, adapter, "head_out", prompt)
    attn = record(module, adapter, "attn_out", prompt)
    mlp = record(module, adapter, "mlp_out", prompt)
    norm, unembed = get_path(module, adapter.final_norm), get_path(module, adapter.unembed)
    seen, projected = {}, {}
    projs = [site_module(module, adapter, "head_out", l) for l in range(adapter.n_layers)]
    logits = logits_alone(module, prompt, pre=[(norm, lambda x: seen.__setitem__("x", x))],
                          post=[(p, lambda o, l=l: projected.__setitem__(l, first(o)))
                                for l, p in enumerate(projs)])[0, -1]
    x = seen["x"][0, -1]
    pre_cap = unembed(norm(x[None]))[0]
    scale = float(logits @ pre_cap / (pre_cap @ pre_cap))
    linear_logits = torch.allclose(logits, pre_cap * scale, atol=1e-5, rtol=1e-5)
    if not linear_logits:                  # a soft-cap: the values before it
        scale, logits = 1.0, pre_cap
    linear, _ = frozen_norm(norm, x)
    readout = (unembed.weight[GOOD] - unembed.weight[BAD]) * scale
    share = lambda v: readout @ linear(v)  # noqa: E731
    post_norm = any(not torch.allclose(projected[l], attn[l]) for l in attn)
    heads = None if post_norm else torch.zeros(adapter.n_layers, adapter.n_heads)
    for layer in range(adapter.n_layers if heads is not None else 0):
        weight = projs[layer].weight
        weight = weight if type(projs[layer]).__name__ == "Conv1D" else weight.T  # [in, out]
        d = weight.shape[0] // adapter.n_heads
        for h in range(adapter.n_heads):
            heads[layer, h] = share(z[layer][0, -1, h * d:(h + 1) * d] @ weight[h * d:(h + 1) * d])
    return dict(heads=heads,
                attn=torch.stack([share(attn[l][0, -1]) for l in range(adapter.n_layers)]),
                mlp=torch.stack([share(mlp[l][0, -1]) for l in range(adapter.n_layers)]),
                actual=float(logits[GOOD] - logits[BAD]), capped=not linear_logits)


@torch.no_grad()
def spliced(module, target, sae, prompt, edit=None):
    """(logits, latents) of ``prompt`` with the SAE spliced at ``target``'s output by hand:
    decode(edit(lat)) + (x - decode(lat)); no edit: the output unchanged."""
    seen = {}

    def hook(o):
        x = first(o)
        lat = sae.encode(x)
        seen["lat"] = lat
        if edit is None:
            return None
        lat2 = lat.clone()
        edit(lat2)
        return replace(o, sae.decode(lat2) + (x - sae.decode(lat)))
    logits = logits_alone(module, prompt, post=[(target, hook)])
    return logits, seen["lat"]


@torch.no_grad()
def latent_sweep(module, target, sae, latents):
    """[latent, pos, prompt]: one clean latent patched into the corrupted prompt."""
    out = torch.zeros(len(latents), WIDTH, len(CLEAN))
    for i, (clean, corrupt) in enumerate(zip(CLEAN, CORRUPT)):
        pad = WIDTH - len(clean)
        _, source = spliced(module, target, sae, clean)
        out[:, :pad, i] = metric(logits_alone(module, corrupt))[0]
        for j, lat in enumerate(latents):
            for p in range(pad, WIDTH):
                def edit(x, p=p - pad, lat=lat):
                    x[0, p, lat] = source[0, p, lat]
                out[j, p, i] = metric(spliced(module, target, sae, corrupt, edit)[0])[0]
    return out


@torch.no_grad()
def path_to_logits(module, adapter):
    """[layer, head, prompt]: on the clean prompt, one sender head's slice of the
    out-projection's input from the corrupted run, every other head's frozen at the clean
    run (MLPs and norms recomputed): the metric."""
    heads = adapter.n_heads
    out = torch.zeros(adapter.n_layers, heads, len(CLEAN))
    for i, (clean, corrupt) in enumerate(zip(CLEAN, CORRUPT)):
        z_clean = record(module, adapter, "head_out", clean)
        z_corrupt = record(module, adapter, "head_out", corrupt)
        projs = [site_module(module, adapter, "head_out", l) for l in range(adapter.n_layers)]
        for layer in range(adapter.n_layers):
            d = z_clean[layer].shape[-1] // heads
            for h in range(heads):
                def frozen(x, l, layer=layer, h=h):
                    x = z_clean[l].clone()
                    if l == layer:
                        x[..., h * d:(h + 1) * d] = z_corrupt[l][..., h * d:(h + 1) * d]
                    return x
                pre = [(p, lambda x, l=l: frozen(x, l)) for l, p in enumerate(projs)]
                out[layer, h, i] = metric(logits_alone(module, clean, pre=pre))[0]
    return out


@torch.no_grad()
def path_to_query(module, adapter, receiver=(1, 0)):
    """[layer, head, prompt]: path patching to one receiver head's query. Run 1: the clean
    prompt, the sender's slice of the out-projection's input from the corrupted run, every
    other head's frozen at the clean run; the receiver's ``q`` (as attention reads it) kept.
    Run 2: the clean prompt with only that query replaced: the metric."""
    heads, (r_layer, r_head) = adapter.n_heads, receiver
    out = torch.zeros(adapter.n_layers, heads, len(CLEAN))
    projs = [site_module(module, adapter, "head_out", l) for l in range(adapter.n_layers)]
    for i, (clean, corrupt) in enumerate(zip(CLEAN, CORRUPT)):
        z_clean = record(module, adapter, "head_out", clean)
        z_corrupt = record(module, adapter, "head_out", corrupt)
        for layer in range(adapter.n_layers):
            d = z_clean[layer].shape[-1] // heads
            for h in range(heads):
                def frozen(x, l, layer=layer, h=h):
                    x = z_clean[l].clone()
                    if l == layer:
                        x[..., h * d:(h + 1) * d] = z_corrupt[l][..., h * d:(h + 1) * d]
                    return x
                seen = {}
                with hooked(pre=[(p, lambda x, l=l: frozen(x, l)) for l, p in enumerate(projs)]):
                    with by_hand(module, seen):
                        module(input_ids=torch.tensor([clean]))
                query = seen[r_layer]["q"][:, r_head].clone()

                def patch(l, what, x, query=query):
                    if l != r_layer or what != "q":
                        return x
                    x = x.clone()
                    x[:, r_head] = query
                    return x
                out[layer, h, i] = metric(logits_by_hand(module, clean, patch)[0])[0]
    return out
