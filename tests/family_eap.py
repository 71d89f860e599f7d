"""EAP's closed form with plain hooks, one prompt alone, on any family whose checked site map
states attention's inputs (``attn_norm``, ``mlp_norm``, ``qkv``, ``qkv_layout``): for each
upstream (sender, receiver) pair, (clean - corrupted write of the sender) . d metric / d the
receiver's input at the corrupted prompt, summed over its positions, averaged over prompts.
The oracle for the ``eap`` column of tests/test_family_matrix.py (the pieces of
tests/test_edges_families.py, with the family facts taken from the map).

Post-norm families (Gemma 2/3, OLMo 2/3: a norm after attention and after the MLP): the
senders are what the block adds, read at those norms' outputs: one ``ATTN{l}`` per layer
(attention's whole write) and ``MLP{l}``. OLMo 2/3 have no pre-norm (their decoder layer
calls ``self_attn`` and ``mlp`` on the stream itself): a receiver's input is then the
projection's or the MLP's own input, with no norm to back-propagate through."""

from __future__ import annotations

import torch

from ipy_intervene.arch.sites import get_path

from family_oracles import CLEAN, CORRUPT, first, hooked, metric


class Parts:
    """A model's parts as the oracle reads them, from the map's paths."""

    def __init__(self, module, adapter):
        self.root, self.a = module, adapter
        self.blocks = get_path(module, adapter.blocks)
        self.final = get_path(module, adapter.final_norm)
        self.n, self.H = adapter.n_layers, adapter.n_heads
        self.parallel = adapter.mid_norm is None
        self.heads = adapter.post_attn_norm is None          # one write per head
        self.attn_norm = adapter.attn_norm                   # None: no pre-norm (OLMo 2/3)
        self.mlp_norm = adapter.mlp_norm or adapter.mid_norm
        if self.mlp_norm == adapter.mlp:                     # the MLP reads the stream itself
            self.mlp_norm = None
        config = module.config
        self.d = getattr(config, "head_dim", None) or config.hidden_size // self.H
        widths = [self.weight(0, path).shape[0] for path in adapter.qkv]
        if adapter.qkv_layout == "separate":
            self.d = widths[0] // self.H
            self.KV = widths[1] // self.d
        elif adapter.qkv_layout == "blocks":
            self.KV = (widths[0] // self.d - self.H) // 2
        else:                                          # per_head: [q | k | v] of each head
            self.KV = self.H

    def part(self, layer, path):
        return get_path(self.blocks[layer], path)

    def attn_normed(self, layer, x):
        """Attention's pre-norm applied to ``x`` (``x`` itself where there is none), without
        the norm's hooks."""
        return x if self.attn_norm is None else self.part(layer, self.attn_norm).forward(x)

    def weight(self, layer, path):
        """[out, in] whatever the class (Conv1D keeps [in, out])."""
        module = self.part(layer, path)
        return module.weight.T if type(module).__name__ == "Conv1D" else module.weight

    def proj(self, layer, t):
        """(projection path, its output columns for input t of head / kv head i)."""
        a, d, H, KV = self.a, self.d, self.H, self.KV
        if a.qkv_layout == "separate":
            return a.qkv["qkv".index(t)], lambda i: slice(i * d, (i + 1) * d)
        if a.qkv_layout == "blocks":
            off = {"q": 0, "k": H * d, "v": H * d + KV * d}[t]
            return a.qkv[0], lambda i: slice(off + i * d, off + (i + 1) * d)
        off = "qkv".index(t) * d
        return a.qkv[0], lambda i: slice(i * 3 * d + off, i * 3 * d + off + d)

    def receivers(self):
        names = []
        kv = (lambda l, g: f"L{l}H{g}") if self.KV == self.H else (lambda l, g: f"L{l}KV{g}")
        for l in range(self.n):
            names += [(f"L{l}H{h}.q", "q", l, h) for h in range(self.H)]
            names += [(f"{kv(l, g)}.{t}", t, l, g) for t in "kv" for g in range(self.KV)]
            names.append((f"MLP{l}", "mlp", l, -1))
        return names + [("logits", "logits", self.n, -1)]


def writes(parts, prompt):
    """{sender: its write [1, seq, d_model]} of one plain forward."""
    out, pre, post = {}, [], []
    pre.append((parts.blocks[0], lambda x: out.__setitem__("embed", x.detach())))
    a = parts.a
    for l in range(parts.n):
        w, d = parts.weight(l, a.head_proj), parts.d

        def heads(z, l=l, w=w):
            for h in range(parts.H):
                out[f"L{l}H{h}"] = (z[..., h * d:(h + 1) * d] @ w[:, h * d:(h + 1) * d].T
                                    ).detach()
        if parts.heads:
            pre.append((parts.part(l, a.head_proj), heads))
        else:                               # the post-norm's output: what the block adds
            post.append((parts.part(l, a.post_attn_norm),
                         lambda o, l=l: out.__setitem__(f"ATTN{l}", first(o).detach())))
        post.append((parts.part(l, a.post_mlp_norm or a.mlp),
                     lambda o, l=l: out.__setitem__(f"MLP{l}", first(o).detach())))
    with hooked(pre, post), torch.no_grad():
        parts.root(input_ids=torch.tensor([prompt]))
    return out


def grads(parts, prompt, embed=None):
    """{receiver: d metric / d its input [1, seq, d_model]}: zero leaves where only that
    receiver reads (the projection's output, then back through attention's norm by hand;
    the MLP's own normed input; the final norm's input). ``embed``: block 0's input instead
    of the model's (EAP-IG's interpolation points)."""
    a, leaves, resid, pre, post = parts.a, {}, {}, [], []
    if embed is not None:
        pre.append((parts.blocks[0], lambda x: embed))
    for l in range(parts.n):
        pre.append((parts.part(l, a.attn_norm or a.attn),     # no pre-norm: attention's input
                    lambda x, l=l: resid.__setitem__(l, x.detach())))
        for path in dict.fromkeys(a.qkv):
            def add(o, key=(l, path)):
                leaves[key] = torch.zeros_like(o, requires_grad=True)
                return o + leaves[key]
            post.append((parts.part(l, path), add))
        if parts.mlp_norm is None:                 # the MLP reads the stream itself
            def mlp_own(x, l=l):
                leaves[f"MLP{l}"] = torch.zeros_like(x, requires_grad=True)
                return x + leaves[f"MLP{l}"]
            pre.append((parts.part(l, a.mlp), mlp_own))
            continue
        seen = {}
        norm = parts.part(l, parts.mlp_norm)
        pre.append((norm, lambda x, seen=seen: seen.__setitem__("x", x)))

        def mlp_in(x, l=l, seen=seen, norm=norm):
            leaves[f"MLP{l}"] = torch.zeros_like(seen["x"], requires_grad=True)
            return norm(seen["x"] + leaves[f"MLP{l}"])
        pre.append((parts.part(l, a.mlp), mlp_in))

    def final_in(x):
        leaves["logits"] = torch.zeros_like(x, requires_grad=True)
        return x + leaves["logits"]
    pre.append((parts.final, final_in))
    with hooked(pre, post), torch.enable_grad():
        value = metric(parts.root(input_ids=torch.tensor([prompt])).logits).sum()
        keys = list(leaves)
        got = dict(zip(keys, torch.autograd.grad(value, [leaves[k] for k in keys])))
    out = {}
    for name, kind, l, i in parts.receivers():
        if kind in ("mlp", "logits"):
            out[name] = got[name]
            continue
        path, cols = parts.proj(l, kind)
        g_out = got[(l, path)][..., cols(i)]
        x = resid[l].clone().requires_grad_(True)
        with torch.enable_grad():
            y = parts.attn_normed(l, x) @ parts.weight(l, path)[cols(i)].T
            (out[name],) = torch.autograd.grad((y * g_out).sum(), x)
    return out


def layer_of(name, n):
    if name in ("embed", "logits"):
        return -1 if name == "embed" else n
    if name.startswith("ATTN"):
        return int(name[4:])
    return int(name.split(".")[0].lstrip("MLP").split("H")[0].split("KV")[0].lstrip("L"))


def eap_scores(module, adapter, graph):
    """[senders, receivers]: the closed form, NaN where the receiver is not downstream; and
    the expected upstream mask."""
    parts = Parts(module, adapter)
    names = ["embed"]
    for l in range(parts.n):
        names += [f"L{l}H{h}" for h in range(parts.H)] if parts.heads else [f"ATTN{l}"]
        names.append(f"MLP{l}")
    assert [n.name for n in graph.senders] == names, "EAP: the senders differ"
    assert [n[0] for n in parts.receivers()] == [n.name for n in graph.receivers], \
        "EAP: the receivers differ"
    want = torch.zeros(len(graph.senders), len(graph.receivers))
    for clean, corrupt in zip(CLEAN, CORRUPT):
        w_clean, w_corrupt, g = writes(parts, clean), writes(parts, corrupt), grads(parts,
                                                                                   corrupt)
        for s, send in enumerate(graph.senders):
            diff = w_clean[send.name] - w_corrupt[send.name]
            for r, recv in enumerate(graph.receivers):
                want[s, r] += float((diff * g[recv.name]).sum()) / len(CLEAN)
    mask = torch.zeros_like(want, dtype=torch.bool)
    for s, send in enumerate(graph.senders):
        for r, recv in enumerate(graph.receivers):
            ls, lr = layer_of(send.name, parts.n), layer_of(recv.name, parts.n)
            attention = send.name.startswith(("L", "ATTN"))
            same = (ls == lr and attention and recv.name.startswith("MLP")
                    and not parts.parallel)
            mask[s, r] = ls < lr or same
    return want.masked_fill(~mask, float("nan")), mask
