"""Custom sites in sweeps (``patch_sweep(dictionary=...)``): a direction, a subspace or a
neuron set read at a module site of every layer; each (layer, position) cell equals a naive
loop of single runs with plain hooks that interchange the dictionary's coordinates there
(``decode(lat2) + (x - decode(lat))``), one prompt at a time, prompts of different lengths."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from conftest import CORRUPT, PROMPT, checksum, hook_count
from ipy_intervene.errors import InputError
from ipy_intervene.features.dictionaries import Direction, Neurons, Subspace
from sweep_oracle import INPUT_SITES, site_module

CLEAN = [PROMPT, "Then , Mary and John had a drink"]
CORRUPTED = [CORRUPT, "Then , Mary and Tom had a drink"]
LENGTH = 15


def metric_fn(model):
    good, bad = model.token_id("Mary"), model.token_id("John")
    return lambda logits: logits[:, -1, good] - logits[:, -1, bad]


def first(out):
    return out[0] if isinstance(out, tuple) else out


def interchanged(dictionary, x, theirs, pos, chosen):
    """The splice's arithmetic by hand at one position: the chosen coordinates swapped."""
    lat = dictionary.encode(x)
    lat2 = lat.clone()
    lat2[0, pos, chosen] = theirs[0, pos, chosen]
    return dictionary.decode(lat2) + (x - dictionary.decode(lat))


def site_value(module, arch, site, layer, kwargs):
    seen = {}
    target = site_module(module, arch, site, layer)
    if site in INPUT_SITES:
        handle = target.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    else:
        handle = target.register_forward_hook(lambda m, a, o: seen.__setitem__("x", first(o)))
    try:
        module(**kwargs)
    finally:
        handle.remove()
    return seen["x"]


@torch.no_grad()
def naive_loop(model, arch, site, dictionary, base_prompts, source_prompts, chosen, n_layers):
    """[cells, prompts], cells layer-major: one patched forward per cell and prompt."""
    module, metric = model.module, metric_fn(model)
    out = torch.zeros(n_layers * LENGTH, len(base_prompts))
    for i, (base_text, source_text) in enumerate(zip(base_prompts, source_prompts)):
        base, source = model.prepare([base_text]).kwargs, model.prepare([source_text]).kwargs
        pad = LENGTH - base["input_ids"].shape[1]
        plain = metric(module(**base).logits)
        for layer in range(n_layers):
            theirs = dictionary.encode(site_value(module, arch, site, layer, source))
            target = site_module(module, arch, site, layer)
            for pos in range(LENGTH):
                cell = layer * LENGTH + pos
                if pos < pad:                   # a padding position of this prompt
                    out[cell, i] = plain
                    continue
                p = pos - pad
                if site in INPUT_SITES:
                    handle = target.register_forward_pre_hook(
                        lambda m, a, p=p: (interchanged(dictionary, a[0], theirs, p, chosen),
                                           *a[1:]))
                else:
                    handle = target.register_forward_hook(
                        lambda m, a, o, p=p: (interchanged(dictionary, first(o), theirs, p,
                                                           chosen), *o[1:])
                        if isinstance(o, tuple) else interchanged(dictionary, o, theirs, p,
                                                                  chosen))
                try:
                    out[cell, i] = metric(module(**base).logits)
                finally:
                    handle.remove()
    return out


def dictionaries(width):
    gen = torch.Generator().manual_seed(0)
    return {"direction": (Direction(torch.randn(width, generator=gen)), [0]),
            "subspace": (Subspace(torch.randn(3, width, generator=gen)), [0, 1, 2]),
            "neurons": (Neurons([1, 5, 9, 30], width), [0, 2, 3])}


@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "mlp_out", "attn_out"])
@pytest.mark.parametrize("kind", ["direction", "subspace", "neurons"])
def test_custom_site_sweep_equals_naive_loop(arch_model, site, kind):
    arch, model = arch_model
    dictionary, chosen = dictionaries(model.config.hidden_size)[kind]
    latents = chosen if kind == "neurons" else None     # a subset of the neuron set
    result = ii.patch_sweep(model, CLEAN, CORRUPTED, ii.logit_diff("Mary", "John"), site=site,
                            dictionary=dictionary, latents=latents, batch_size=7)
    n_layers = model.config.num_hidden_layers
    expected = naive_loop(model, arch, site, dictionary, CORRUPTED, CLEAN, chosen, n_layers)
    torch.testing.assert_close(result.per_prompt.reshape(expected.shape), expected,
                               atol=1e-5, rtol=0)
    assert (expected - expected[:1]).abs().max() > 1e-4      # the interchanges do matter
    assert result.extra["dictionary"].startswith(type(dictionary).__name__)


def test_direction_patch_differs_from_the_whole_activation(demo):
    v = torch.randn(demo.config.n_embd, generator=torch.Generator().manual_seed(1))
    metric = ii.logit_diff("Mary", "John")
    along = ii.patch_sweep(demo, PROMPT, CORRUPT, metric, site="resid_post",
                           dictionary=Direction(v), direction="noising")
    whole = ii.patch_sweep(demo, PROMPT, CORRUPT, metric, site="resid_post",
                           direction="noising")
    full = Subspace(torch.eye(demo.config.n_embd))           # every coordinate: the whole
    everything = ii.patch_sweep(demo, PROMPT, CORRUPT, metric, site="resid_post",
                                dictionary=full, direction="noising")
    torch.testing.assert_close(everything.values, whole.values, atol=1e-4, rtol=0)
    assert float((along.values - whole.values).abs().max()) > 1e-2
    expected = naive_loop(demo, "gpt2", "resid_post", Direction(v), [PROMPT], [CORRUPT], [0],
                          demo.config.n_layer)
    torch.testing.assert_close(along.per_prompt.reshape(expected.shape), expected,
                               atol=1e-5, rtol=0)


def test_custom_site_attribution_is_the_gradient_times_the_interchange(demo):
    sub = Subspace(torch.randn(2, demo.config.n_embd,
                               generator=torch.Generator().manual_seed(2)))
    result = ii.patch_sweep(demo, CLEAN, CORRUPTED, ii.logit_diff("Mary", "John"),
                            site="mlp_out", dictionary=sub, method="attribution")
    module, metric = demo.module, metric_fn(demo)
    batch = {t: demo.prepare([t]).kwargs for t in CLEAN + CORRUPTED}
    expected = torch.zeros(4 * LENGTH, 2)
    for i, (clean, corrupt) in enumerate(zip(CLEAN, CORRUPTED)):
        pad = LENGTH - batch[clean]["input_ids"].shape[1]
        seen = {}
        hooks = [module.transformer.h[l].mlp.register_forward_hook(
            lambda m, a, o, l=l: seen.__setitem__(l, o)) for l in range(4)]
        try:
            with torch.no_grad():
                module(**batch[clean])
                theirs = dict(seen)
            with torch.enable_grad():
                score = metric(module(**batch[corrupt]).logits)
                grads = torch.autograd.grad(score.sum(), [seen[l] for l in range(4)])
        finally:
            for h in hooks:
                h.remove()
        for l in range(4):
            x = seen[l].detach()
            for pos in range(pad, LENGTH):
                moved = interchanged(sub, x, sub.encode(theirs[l]), pos - pad, [0, 1])
                change = ((moved - x) * grads[l]).sum(-1)[0, pos - pad]
                expected[l * LENGTH + pos, i] = score.detach() + change
        expected[[l * LENGTH + p for l in range(4) for p in range(pad)], i] = score.detach()
    torch.testing.assert_close(result.per_prompt.reshape(expected.shape), expected,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("call, words", [
    (dict(site="head_out", dictionary="dir"), "module site of every layer"),
    (dict(site="resid_pre", method="noise", subject="Mary", dictionary="dir"),
     "method activation or attribution"),
    (dict(site="resid_pre", dictionary=torch.nn.Linear(2, 2)), "has no `encode`"),
    (dict(site="resid_pre", dictionary="dir", latents=[3]), "latent 3 is out of range"),
])
def test_custom_site_errors_are_clear_and_leave_the_model(demo, call, words):
    if call.get("dictionary") == "dir":
        call["dictionary"] = Direction(torch.ones(demo.config.n_embd))
    hooks, weights = hook_count(demo.module), checksum(demo.module)
    with pytest.raises((InputError, ii.errors.SiteError), match=words):
        ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"), **call)
    assert hook_count(demo.module) == hooks and checksum(demo.module) == weights


def test_screen_and_verify_on_a_custom_site(demo):
    sub = Subspace(torch.randn(4, demo.config.n_embd,
                               generator=torch.Generator().manual_seed(3)))
    metric = ii.logit_diff("Mary", "John")
    s = ii.screen_and_verify(demo, PROMPT, CORRUPT, metric, site="resid_pre",
                             method="attribution", dictionary=sub, latents=[0, 2], top=3,
                             check=True)
    exact = ii.patch_sweep(demo, PROMPT, CORRUPT, metric, site="resid_pre", dictionary=sub,
                           latents=[0, 2])
    torch.testing.assert_close(s.exact.values, exact.values)
    for cell in s.cells:
        assert cell["exact"] == pytest.approx(float(exact.values[cell["index"]]), abs=1e-6)
