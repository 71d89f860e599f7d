"""Naive sweeps written with plain PyTorch hooks: one full forward per grid cell.

This is the oracle the batched engine is checked against (and the baseline the benchmark
times): it shares no code with ipy_intervene.sweep, and names the modules of each
architecture itself.
"""

from __future__ import annotations

import torch

# module of each site, relative to a block, per architecture (None: the block itself)
BLOCKS = {"gpt2": "transformer.h", "neox": "gpt_neox.layers", "llama": "model.layers"}
PARTS = {
    "gpt2": {"attn_out": "attn", "mlp_out": "mlp", "resid_mid": "ln_2", "head": "attn.c_proj",
             "embed": "transformer.wte"},
    "neox": {"attn_out": "attention", "mlp_out": "mlp", "resid_mid": "post_attention_layernorm",
             "head": "attention.dense", "embed": "gpt_neox.embed_in"},
    "llama": {"attn_out": "self_attn", "mlp_out": "mlp", "resid_mid": "post_attention_layernorm",
              "head": "self_attn.o_proj", "embed": "model.embed_tokens"},
}
INPUT_SITES = {"resid_pre", "resid_mid", "head_out", "head_out_pos"}


def serial_neox(vocab):
    """A GPT-NeoX without the parallel residual, so resid_mid exists."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        use_parallel_residual=False, bos_token_id=0, eos_token_id=0,
                        pad_token_id=1)
    return GPTNeoXForCausalLM(cfg).eval()


def get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def site_module(module, arch, site, layer):
    block = get(module, BLOCKS[arch])[layer]
    if site in ("resid_pre", "resid_post"):
        return block
    return get(block, PARTS[arch]["head" if site.startswith("head") else site])


def _tensor(value):
    return value[0] if isinstance(value, tuple) else value


def record_site(module, arch, site, layer_list, kwargs):
    """{layer: activation} of one plain forward."""
    seen, handles = {}, []
    for layer in layer_list:
        target = site_module(module, arch, site, layer)
        if site in INPUT_SITES:
            handles.append(target.register_forward_pre_hook(
                lambda m, args, layer=layer: seen.__setitem__(layer, args[0].clone())))
        else:
            handles.append(target.register_forward_hook(
                lambda m, args, out, layer=layer: seen.__setitem__(layer, _tensor(out).clone())))
    try:
        logits = module(**kwargs).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def _write(x, pos, head, value, n_heads):
    """x[:, pos(, head)] = value; pos None means every position."""
    where = slice(None) if pos is None else pos
    if head is None:
        x[:, where] = value
    else:
        x.view(*x.shape[:-1], n_heads, -1)[:, where, head] = value


def patched_logits(module, arch, site, patches, kwargs, n_heads, noise=None):
    """Logits of one forward with ``patches``: [(layer, pos, head, source activation)]."""
    handles = []
    for layer, pos, head, src in patches:
        target = site_module(module, arch, site, layer)
        value = src[:, slice(None) if pos is None else pos]
        if head is not None:
            value = value.view(*value.shape[:-1], n_heads, -1)[..., head, :]
        if site == "resid_mid":  # the residual stream itself: edit it in place
            def hook(m, args, pos=pos, head=head, value=value):
                _write(args[0], pos, head, value, n_heads)
            handles.append(target.register_forward_pre_hook(hook))
        elif site in INPUT_SITES:
            def hook(m, args, pos=pos, head=head, value=value):
                x = args[0].clone()
                _write(x, pos, head, value, n_heads)
                return (x, *args[1:])
            handles.append(target.register_forward_pre_hook(hook))
        else:
            def hook(m, args, out, pos=pos, head=head, value=value):
                x = _tensor(out).clone()
                _write(x, pos, head, value, n_heads)
                return (x, *out[1:]) if isinstance(out, tuple) else x
            handles.append(target.register_forward_hook(hook))
    if noise is not None:
        embed = get(module, PARTS[arch]["embed"])
        handles.append(embed.register_forward_hook(lambda m, a, out: out + noise.to(out.dtype)))
    try:
        return module(**kwargs).logits
    finally:
        for h in handles:
            h.remove()


def cells(site, n_layers, length, n_heads):
    if site == "head_out":
        return [(l, None, h) for l in range(n_layers) for h in range(n_heads)]
    if site == "head_out_pos":
        return [(l, p, h) for l in range(n_layers) for p in range(length) for h in range(n_heads)]
    return [(l, p, None) for l in range(n_layers) for p in range(length)]


@torch.no_grad()
def naive_activation(module, arch, site, base_kwargs, source_kwargs, metric, n_layers,
                     n_heads):
    """[cells, prompts]: the metric per prompt with each cell patched from source into base."""
    length = base_kwargs["input_ids"].shape[1]
    source, _ = record_site(module, arch, site, range(n_layers), source_kwargs)
    rows = []
    for layer, pos, head in cells(site, n_layers, length, n_heads):
        logits = patched_logits(module, arch, site, [(layer, pos, head, source[layer])],
                                base_kwargs, n_heads)
        rows.append(metric(logits))
    return torch.stack(rows)


def logit_diff(good, bad):
    return lambda logits: logits[:, -1, good] - logits[:, -1, bad]


def rome_window(layer, window, n_layers):
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


@torch.no_grad()
def naive_causal_trace(module, arch, site, kwargs, subject_positions, metric, n_layers,
                       samples, seed, window, scale=3.0):
    """ROME's procedure, written out: noise the subject embeddings of ``samples`` copies,
    restore the clean state of each (layer window, position), average the metric."""
    embed = get(module, PARTS[arch]["embed"])
    rows, length = kwargs["input_ids"].shape
    emb = embed(kwargs["input_ids"])
    mask = torch.zeros(rows, length, dtype=torch.bool)
    mask[:, subject_positions] = True
    std = scale * float(emb[mask].std())
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, rows, length, emb.shape[-1], generator=gen) * std
    noise = (noise * mask[None, :, :, None]).reshape(samples * rows, length, -1)
    noised = {k: v.repeat(samples, *([1] * (v.dim() - 1))) for k, v in kwargs.items()}
    clean, _ = record_site(module, arch, site, range(n_layers), kwargs)
    out = []
    for layer in range(n_layers):
        for pos in range(length):
            patches = [(l, pos, None, clean[l].repeat(samples, 1, 1))
                       for l in rome_window(layer, window, n_layers)]
            logits = patched_logits(module, arch, site, patches, noised, 0, noise=noise)
            out.append(metric(logits).view(samples, rows).mean(0))
    return torch.stack(out)


def hand_attribution(module, arch, site, base_kwargs, source_kwargs, metric, n_layers,
                     n_heads):
    """(a_source - a_base) . d metric / d a_base, per cell and prompt, with autograd by hand."""
    with torch.no_grad():
        source, _ = record_site(module, arch, site, range(n_layers), source_kwargs)
    base, handles = {}, []
    for layer in range(n_layers):
        target = site_module(module, arch, site, layer)
        if site in INPUT_SITES:
            handles.append(target.register_forward_pre_hook(
                lambda m, args, layer=layer: base.__setitem__(layer, args[0])))
        else:
            handles.append(target.register_forward_hook(
                lambda m, args, out, layer=layer: base.__setitem__(layer, _tensor(out))))
    try:
        with torch.enable_grad():
            scores = metric(module(**base_kwargs).logits)
            grads = torch.autograd.grad(scores.sum(), [base[l] for l in range(n_layers)])
    finally:
        for h in handles:
            h.remove()
    length = base_kwargs["input_ids"].shape[1]
    rows = []
    for layer, pos, head in cells(site, n_layers, length, n_heads):
        term = (source[layer] - base[layer].detach()) * grads[layer]
        if head is not None:
            term = term.view(*term.shape[:-1], n_heads, -1)[..., head, :]
        term = term.sum(-1)
        rows.append(scores.detach() + (term.sum(1) if pos is None else term[:, pos]))
    return torch.stack(rows)
