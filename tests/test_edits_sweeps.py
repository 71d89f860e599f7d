"""Sweeps of an edited model (issue 30), for edits of every site kind: several modules,
positions counted from each prompt's start, a head, an attention pattern, a splice's latent.
Each ``ii.patch_sweep`` of the edited model (activation patching of ``resid_pre``,
``attn_out`` and ``head_out``; attribution patching) equals a loop of plain PyTorch hooks on
the original model, one prompt at a time, that apply the edit by hand and patch the cell by
hand, for a batch of prompts of different lengths (the package pads on the left)."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from conftest import CORRUPT, PROMPT, hook_count
from test_edits import Hand

PAIRS = [(PROMPT, CORRUPT),
         ("Then , Mary and John had a drink . John gave it to",
          "Then , Mary and John had a drink . Mary gave it to"),
         ("Mary and John had a drink , John gave it to", "Mary and John had a drink , Mary gave it to")]
CLEAN, CORRUPTED = [c for c, _ in PAIRS], [k for _, k in PAIRS]
TOL = 1e-5
WIDTH = 32       # the demo's head width (128 wide, 4 heads)


def clone_out(fn):
    """A forward hook applying ``fn`` in place to a copy of the module's (first) output."""
    def post(mod, args, out):
        first = (out[0] if isinstance(out, tuple) else out).clone()
        fn(first)
        return (first, *out[1:]) if isinstance(out, tuple) else first
    return post


def clone_in(fn):
    """A forward pre-hook applying ``fn`` in place to a copy of the module's input."""
    def pre(mod, args):
        x = args[0].clone()
        fn(x)
        return (x, *args[1:])
    return pre


def zero_head(head):
    def fn(x):
        x[..., head * WIDTH:(head + 1) * WIDTH] = 0
    return clone_in(fn)


def edits_by_hand(model, vec):
    """(cell, [(module, 'post'|'pre', plain hook)]) for each kind of edit: the hooks do by
    hand, on one prompt, what the cell does to each prompt of a batch."""
    h = model.module.transformer.h

    def steer(x):
        x[:, -1] += 3 * vec

    def at(pos, value):
        def fn(x):
            x[:, pos] = value
        return fn

    def half_last(x):
        x[:, -1] *= 0.5

    return {
        "modules": ("model.transformer.h[0].mlp.output[:, 1] = 0\n"
                    "model.transformer.h[2].output[:, -1] += 3 * vec",
                    [(h[0].mlp, "post", clone_out(at(1, 0))), (h[2], "post", clone_out(steer))]),
        "from_start": ("model.transformer.h[1].attn.output[0][:, 3] = 0\n"
                       "model.transformer.h[2].attn.output[0][:, -1] *= 0.5",
                       [(h[1].attn, "post", clone_out(at(3, 0))),
                        (h[2].attn, "post", clone_out(half_last))]),
        "head": ("model.transformer.h[2].attn.c_proj.input[:, :, 32:64] = 0",
                 [(h[2].attn.c_proj, "pre", zero_head(1))]),
        "pattern": ("model.transformer.h[1].attn.pattern.output[:, 2] = 0",
                    [(h[1].attn.c_proj, "pre", zero_head(2))]),
    }


@pytest.fixture(scope="module")
def vec():
    torch.manual_seed(3)
    return torch.randn(128)


@pytest.fixture(scope="module")
def splice(demo):
    """The demo SAE spliced at block 2 (for the latent edit), detached at the end."""
    made = ii.attach(demo, demo.transformer.h[2], ii.load_sae("demo"))
    yield made
    ii.detach(demo)


def zero_latent(x):
    x[:, 2] = 0


def kind_of(demo, vec, splice, kind):
    if kind == "latent":
        return ("model.transformer.h[2].sae.latents.output[:, 2] = 0",
                [(splice.latents, "post", clone_out(zero_latent))])
    return edits_by_hand(demo, vec)[kind]


KINDS = ["modules", "from_start", "head", "pattern", "latent"]


# -- the oracle: one prompt at a time, plain hooks ---------------------------------------------

def site(model, name, layer):
    """(module, 'pre'|'post') where a sweep site is, on the demo GPT-2, written out."""
    block = model.module.transformer.h[layer]
    return {"resid_pre": (block, "pre"), "attn_out": (block.attn, "post"),
            "head_out": (block.attn.c_proj, "pre")}[name]


def ids(model, text):
    return model.tokenizer(text, return_tensors="pt").input_ids


def mary_john(model, logits):
    return logits[0, -1, model.token_id("Mary")] - logits[0, -1, model.token_id("John")]


def read(model, hand, text, name, layer):
    """The site's value ``[1, T, d]`` in the prompt's run with the edit's hooks."""
    module, kind = site(model, name, layer)
    seen = {}

    def keep(x):
        seen["x"] = x.clone()
    grab = clone_in(keep) if kind == "pre" else clone_out(keep)
    with Hand([*hand, (module, kind, grab)]), torch.no_grad():
        model.module(ids(model, text))
    return seen["x"]


def patched(model, hand, text, name, layer, write):
    """The metric of the prompt's run with the edit's hooks, then ``write`` at the site."""
    module, kind = site(model, name, layer)
    patch = clone_in(write) if kind == "pre" else clone_out(write)
    with Hand([*hand, (module, kind, patch)]), torch.no_grad():
        return float(mary_john(model, model.module(ids(model, text)).logits))


def activation_oracle(model, hand, name, per_head):
    """``[layer, pos or head, prompt]``: each cell's metric, one prompt at a time; a batch
    position that is a shorter prompt's padding changes nothing of it."""
    length = max(ids(model, t).shape[1] for t in CLEAN)
    out = torch.zeros(4, 4 if per_head else length, len(PAIRS))
    for i, (clean, corrupt) in enumerate(PAIRS):
        cut = length - ids(model, clean).shape[1]
        plain = patched(model, hand, corrupt, name, 0, lambda x: None)
        for layer in range(4):
            source = read(model, hand, clean, name, layer)
            for j in range(out.shape[1]):
                if per_head:
                    cols = slice(j * WIDTH, (j + 1) * WIDTH)
                    write = lambda x, c=cols: x[..., c].copy_(source[..., c])
                elif j < cut:
                    out[layer, j, i] = plain
                    continue
                else:
                    write = lambda x, q=j - cut: x[:, q].copy_(source[:, q])
                out[layer, j, i] = patched(model, hand, corrupt, name, layer, write)
    return out


def attribution_oracle(model, hand):
    """``[layer, pos, prompt]``: the corrupted run's metric plus (clean - corrupted) . the
    gradient of the metric at ``resid_pre``, one prompt and one layer at a time."""
    length = max(ids(model, t).shape[1] for t in CLEAN)
    out = torch.zeros(4, length, len(PAIRS))
    for i, (clean, corrupt) in enumerate(PAIRS):
        cut = length - ids(model, clean).shape[1]
        for layer in range(4):
            source = read(model, hand, clean, "resid_pre", layer)
            leaf = {}

            def root(mod, args):
                leaf["x"] = args[0].detach().requires_grad_()
                return (leaf["x"], *args[1:])
            block = model.module.transformer.h[layer]
            with Hand([*hand, (block, "pre", root)]):
                score = mary_john(model, model.module(ids(model, corrupt)).logits)
            grad, = torch.autograd.grad(score, leaf["x"])
            effect = ((source - leaf["x"].detach()) * grad).sum(-1)[0]
            out[layer, :cut, i] = float(score.detach())
            out[layer, cut:, i] = float(score.detach()) + effect
    return out


# -- the sweeps ----------------------------------------------------------------------------

def sweep(model, name, method="activation"):
    return ii.patch_sweep(model, CLEAN, CORRUPTED, ii.logit_diff("Mary", "John"), site=name,
                          method=method)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["resid_pre", "attn_out", "head_out"])
def test_an_activation_sweep_of_the_edited_model_equals_plain_hooks_per_prompt(demo, vec, splice,
                                                                                 kind, name):
    cell, hand = kind_of(demo, vec, splice, kind)
    edited = ii.edit(demo, cell, name=kind, namespace={"vec": vec})
    try:
        got = sweep(edited, name)
        want = activation_oracle(demo, hand, name, per_head=name == "head_out")
        torch.testing.assert_close(got.prompt_values, want, atol=TOL, rtol=TOL)
        plain = sweep(demo, name)
        assert (got.prompt_values - plain.prompt_values).abs().max() > 1e-3  # the edit matters
    finally:
        ii.clear_edits(edited)
    assert hook_count(edited.module) == hook_count(demo.module)   # the splice's route alone


@pytest.mark.parametrize("kind", KINDS)
def test_an_attribution_sweep_of_the_edited_model_equals_plain_hooks_per_prompt(demo, vec,
                                                                                  splice, kind):
    cell, hand = kind_of(demo, vec, splice, kind)
    edited = ii.edit(demo, cell, name=kind, namespace={"vec": vec})
    try:
        got = sweep(edited, "resid_pre", "attribution")
        torch.testing.assert_close(got.prompt_values, attribution_oracle(demo, hand),
                                   atol=TOL, rtol=TOL)
    finally:
        ii.clear_edits(edited)


def test_causal_tracing_of_an_edited_model_equals_the_staircase_on_hand_hooks(demo, vec):
    """Noised runs: whole forwards of the edited model (the noise added again in each) equal
    the block-by-block engine on the original model with the same edit as plain hooks (an
    edit at the last position, which a block called on its own sees as the model does)."""
    cell = "model.transformer.h[1].output[:, -1] += 3 * vec"
    hand = [(demo.module.transformer.h[1], "post",
             clone_out(lambda x: x[:, -1].__iadd__(3 * vec)))]
    edited = ii.edit(demo, cell, name="steer", namespace={"vec": vec})
    options = dict(method="noise", subject="Mary", samples=3, site="resid_pre")
    try:
        got = ii.patch_sweep(edited, PROMPT, None, ii.logit_diff("Mary", "John"), **options)
        with Hand(hand):
            want = ii.patch_sweep(demo, PROMPT, None, ii.logit_diff("Mary", "John"), **options)
        torch.testing.assert_close(got.raw, want.raw, atol=TOL, rtol=TOL)
        assert (got.clean, got.corrupted) == pytest.approx((want.clean, want.corrupted), abs=TOL)
    finally:
        ii.clear_edits(edited)


def test_an_unedited_sweep_keeps_the_staircase(demo, monkeypatch):
    from ipy_intervene.sweep.staircase import Engine

    def refuse(self, cells):
        raise AssertionError("an unedited model ran whole forwards")
    monkeypatch.setattr(Engine, "_whole", refuse)
    sweep(demo, "resid_pre")


def test_a_cluster_sweep_of_an_edited_model_is_refused(demo, monkeypatch):
    """A cluster's workers rebuild the model from its weights, without its edits."""
    from ipy_intervene.errors import InputError
    from ipy_intervene.sweep import cluster

    monkeypatch.setattr(cluster, "_ray", lambda: None)   # refused before any worker starts
    edited = ii.edit(demo, "model.transformer.h[2].mlp.output[:] = 0", name="no_mlp")
    try:
        with pytest.raises(InputError, match="without its edits .no_mlp"):
            ii.patch_sweep(edited, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"),
                           cluster=ii.RayCluster(workers=2))
    finally:
        ii.clear_edits(edited)
