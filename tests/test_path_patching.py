"""Path patching against a naive plain-hooks implementation: one sender at a time, head
outputs frozen at the out-projection's input, receiver queries patched at the query
projection's output (before rotary embeddings: the same patch, since rotary is a fixed map
per position), on GPT-2, NeoX and Llama (GQA) shapes."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from ipy_intervene.arch.sites import adapter_for, get_path
from conftest import ARCHS, CORRUPT, PROMPT, hook_count, tiny_model

METRIC = ii.logit_diff("Mary", "John")


def pre(module, fn):
    """A pre-hook whose ``fn`` may return a new first argument (or None: keep it)."""
    def hook(m, args):
        new = fn(args[0])
        return None if new is None else (new, *args[1:])
    return module.register_forward_pre_hook(hook)


def post(module, fn):
    return module.register_forward_hook(lambda m, args, out: fn(out))


def out_proj(model, layer):
    a = adapter_for(model)
    return get_path(a.block(model.module, layer), a.head_proj)


def q_projection(arch, model, layer):
    """(module, get q [b, s, H, dh] from its output, put q back) for one architecture."""
    a = adapter_for(model)
    attn = get_path(a.block(model.module, layer), a.attn)
    heads = a.n_heads
    if arch == "gpt2":
        d = attn.embed_dim
        return attn.c_attn, lambda o: o[..., :d].view(*o.shape[:2], heads, -1)
    if arch == "neox":
        return attn.query_key_value, lambda o: o.view(*o.shape[:2], heads, -1)[..., :attn.head_size]
    return attn.q_proj, lambda o: o.view(*o.shape[:2], heads, -1)


def z_of(model, text):
    kept, handles = {}, []
    a = adapter_for(model)
    for layer in range(a.n_layers):
        handles.append(pre(out_proj(model, layer),
                           lambda z, layer=layer: kept.__setitem__(layer, z.clone())))
    try:
        model.module(model.to_tokens(text))
    finally:
        for h in handles:
            h.remove()
    return kept


@torch.no_grad()
def naive(arch, model, sender, receivers, positions):
    """One sender, by hand: freeze every head's output at clean except the sender's
    (corrupted), keep the receivers' queries; then patch only those into a clean run."""
    a = adapter_for(model)
    clean, corrupt = z_of(model, PROMPT), z_of(model, CORRUPT)
    metric = METRIC.bind(model, 1)
    ids = model.to_tokens(PROMPT)

    def frozen(layer):
        def fn(z):
            new = clean[layer].clone().view(*z.shape[:2], a.n_heads, -1)
            if layer == sender[0]:
                src = corrupt[layer].view(*z.shape[:2], a.n_heads, -1)
                new[:, positions, sender[1]] = src[:, positions, sender[1]]
            return new.reshape(z.shape)
        return fn

    handles = [pre(out_proj(model, layer), frozen(layer)) for layer in range(a.n_layers)]
    kept = {}
    for layer in {l for l, _ in receivers or []}:
        module, q_of = q_projection(arch, model, layer)
        handles.append(post(module, lambda o, layer=layer, q_of=q_of:
                            kept.__setitem__(layer, q_of(o).clone())))
    logits = model.module(ids).logits
    for h in handles:
        h.remove()
    if receivers is None:
        return float(metric(logits))
    handles = []
    for layer in kept:
        module, q_of = q_projection(arch, model, layer)
        mine = [h for l, h in receivers if l == layer]

        def patch(o, layer=layer, q_of=q_of, mine=mine):
            o = o.clone()
            q = q_of(o)  # a view of o
            for h in mine:
                q[:, positions, h] = kept[layer][:, positions, h]
            return o
        handles.append(post(module, patch))
    try:
        return float(metric(model.module(ids).logits))
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module", params=ARCHS)
def sharp(request, demo):
    """A tiny random model whose weights are 8x the usual scale, so that attention is not
    nearly uniform and one head's path has an effect well above the tolerance."""
    module = tiny_model(request.param, len(demo.tokenizer))
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() == 2:
                param.mul_(8)
    return request.param, ii.wrap(module, demo.tokenizer)


@pytest.mark.parametrize("receivers, positions", [
    (None, [14]), ([(2, 1)], [14]), ([(2, 0), (2, 3)], None)], ids=["logits", "q-last", "q-all"])
def test_path_patching_equals_a_naive_hooks_loop(sharp, receivers, positions):
    arch, model = sharp
    result = ii.path_patch(model, PROMPT, CORRUPT, METRIC, receivers=receivers or "logits",
                           positions=positions, batch_size=5)
    where = positions if positions is not None else list(range(15))
    expected = torch.tensor([[naive(arch, model, (l, h), receivers, where)
                              for h in range(4)] for l in range(3)])
    torch.testing.assert_close(result.raw, expected, rtol=0, atol=1e-5)
    assert (expected - result.clean).abs().max() > 1e-4  # some sender matters: 10x atol
    assert hook_count(model.module) == 0


def test_path_patching_on_the_demo_model_and_its_errors(demo):
    r = ii.path_patch(demo, PROMPT, CORRUPT, METRIC, receivers=[(3, 0)], positions=[-1])
    assert r.values.shape == (4, 4) and r.dims == ("layer", "head")
    # a receiver's own layer cannot send to it (eager vs the clean run's SDPA: float error)
    torch.testing.assert_close(r.raw[3], torch.full((4,), r.clean), rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="outside the model"):
        ii.path_patch(demo, PROMPT, CORRUPT, METRIC, receivers=[(4, 0)])
    with pytest.raises(InputError, match="'q', 'k' or 'v'"):
        ii.path_patch(demo, PROMPT, CORRUPT, METRIC, receivers=[(3, 0)], receiver_input="o")
    assert demo.module.config._attn_implementation == "sdpa"


def test_top_ranks_by_distance_from_the_unpatched_run(demo):
    """Path patching and noising patch into the clean run: no effect is 1, not 0."""
    r = ii.path_patch(demo, PROMPT, CORRUPT, METRIC, positions=[-1])
    assert r.unpatched == 1.0
    best = r.top(1)[0]
    assert best["value"] == float(r.values.min())  # the largest drop, L1H3 on the demo model
    assert (best["layer"], best["head"]) == (1, 3)
