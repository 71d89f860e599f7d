"""``ii.cache``, ``ii.attention_patterns`` and ``ii.decompose`` of an edited model (issue 30),
for edits of every site kind, against plain PyTorch hooks on the original model that apply
the edit by hand and read the values by hand, one prompt at a time (three prompts of
different lengths, batched by the package with left padding); and a right-padded batch,
which an edited model refuses with how to pad on the left."""

from __future__ import annotations

import math

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from test_edits_sweeps import splice, vec  # noqa: F401  (fixtures)
from test_edits_sweeps import CLEAN, CORRUPTED, KINDS, WIDTH, Hand, clone_out, ids, kind_of

TOL = 1e-5
SITES = ["resid_post", "attn_out", "mlp_out", "head_out", "pattern"]


@pytest.fixture(params=KINDS)
def edited(request, demo, vec, splice):
    """(kind, the edited model, the edit's plain hooks); the edit cleared afterwards."""
    cell, hand = kind_of(demo, vec, splice, request.param)
    made = ii.edit(demo, cell, name=request.param, namespace={"vec": vec})
    yield request.param, made, hand
    ii.clear_edits(made)


def by_hand(model, hand, text):
    """Every layer's sites of one prompt's run with the edit's hooks, read by plain hooks:
    ``{(site, layer): [T, ...]}``, the pattern computed from the queries and keys."""
    seen, grabs = {}, []
    for layer, block in enumerate(model.module.transformer.h):
        def keep(name, layer=layer):
            return lambda x: seen.__setitem__((name, layer), x[0].clone())
        grabs += [(block, "post", clone_out(keep("resid_post"))),
                  (block.attn, "post", clone_out(keep("attn_out"))),
                  (block.mlp, "post", clone_out(keep("mlp_out"))),
                  (block.attn.c_attn, "post", clone_out(keep("qkv"))),
                  (block.attn.c_proj, "pre",
                   lambda mod, args, layer=layer: seen.__setitem__(("z", layer), args[0][0]))]
    final = model.module.transformer.ln_f
    grabs.append((final, "pre", lambda mod, args: seen.__setitem__("norm_in", args[0][0])))
    with Hand([*hand, *grabs]), torch.no_grad():
        seen["logits"] = model.module(ids(model, text)).logits[0]
    for layer in range(4):
        z = seen[("z", layer)]
        seen[("head_out", layer)] = z.view(z.shape[0], 4, WIDTH)
        q, k, _ = seen[("qkv", layer)].split(128, -1)
        q, k = (x.view(-1, 4, WIDTH).transpose(0, 1) for x in (q, k))
        scores = q @ k.transpose(1, 2) / math.sqrt(WIDTH)
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        seen[("pattern", layer)] = scores.masked_fill(~causal, -torch.inf).softmax(-1)
    return seen


def hand_patterns(kind, seen, layer):
    """The pattern the edit leaves: the pattern edit zeroes head 2 of layer 1."""
    pattern = seen[("pattern", layer)].clone()
    if kind == "pattern" and layer == 1:
        pattern[2] = 0
    return pattern


def test_the_cache_of_the_edited_model_equals_plain_hooks_per_prompt(demo, edited):
    kind, model, hand = edited
    cached = ii.cache(model, CLEAN, sites=SITES)
    plain = ii.cache(demo, CLEAN, sites=["resid_post"])
    for i, text in enumerate(CLEAN):
        seen = by_hand(demo, hand, text)
        for name in SITES:
            for layer in range(4):
                want = hand_patterns(kind, seen, layer) if name == "pattern" else \
                    seen[(name, layer)]
                torch.testing.assert_close(cached[name, layer][i], want, atol=TOL, rtol=TOL)
    assert max((cached["resid_post", 3][i] - plain["resid_post", 3][i]).abs().max()
               for i in range(len(CLEAN))) > 1e-3                        # the edit matters


def test_attention_patterns_of_the_edited_model_equal_plain_hooks_per_prompt(demo, edited):
    kind, model, hand = edited
    patterns = ii.attention_patterns(model, CLEAN)
    single = ii.attention_patterns(model, CLEAN[2])
    for i, text in enumerate(CLEAN):
        seen = by_hand(demo, hand, text)
        want = torch.stack([hand_patterns(kind, seen, layer) for layer in range(4)])
        torch.testing.assert_close(patterns[i].patterns, want, atol=TOL, rtol=TOL)
    torch.testing.assert_close(single.patterns, patterns[2].patterns, atol=TOL, rtol=TOL)


def test_decompose_of_the_edited_model_equals_plain_hooks_per_prompt(demo, edited):
    """Each head's and MLP's direct share of the logit difference at the last position, the
    final norm's scale frozen from the prompt's own run, and the model's own value; an edit
    that writes to the stream what no component wrote (a steering vector, a scaled attention
    output) is an error, not shares that leave it out."""
    kind, model, hand = edited
    if kind in ("modules", "from_start"):
        with pytest.raises(InputError, match="do not add up") as info:
            ii.decompose(model, CLEAN[0], ii.logit_diff("Mary", "John"))
        assert f"the edits ['{kind}'] (ii.edit)" in str(info.value)   # names the edit,
        assert "architecture" not in str(info.value)                    # not the family
        return
    module = demo.module
    u = (module.lm_head.weight.detach()[demo.token_id("Mary")]
         - module.lm_head.weight.detach()[demo.token_id("John")]).double()
    final = module.transformer.ln_f
    for text in CLEAN:
        got = ii.decompose(model, text, ii.logit_diff("Mary", "John"))
        seen = by_hand(demo, hand, text)
        x = seen["norm_in"][-1].double()
        scale = 1 / torch.sqrt(x.var(unbiased=False) + final.eps)

        def share(v):
            v = v.double()
            return float(((v - v.mean()) * scale * final.weight.detach().double()) @ u)
        heads = torch.zeros(4, 4)
        for layer, block in enumerate(module.transformer.h):
            w_o = block.attn.c_proj.weight.detach()     # Conv1D: [in, out]
            z = seen[("z", layer)][-1]
            for h in range(4):
                cols = slice(h * WIDTH, (h + 1) * WIDTH)
                heads[layer, h] = share(z[cols] @ w_o[cols])
        mlp = torch.tensor([share(seen[("mlp_out", layer)][-1]) for layer in range(4)])
        torch.testing.assert_close(got.heads, heads, atol=TOL, rtol=TOL)
        torch.testing.assert_close(got.layers["mlp"], mlp, atol=TOL, rtol=TOL)
        logits = seen["logits"][-1]
        actual = float(logits[demo.token_id("Mary")] - logits[demo.token_id("John")])
        assert got.actual == pytest.approx(actual, abs=TOL)


def test_a_right_padded_batch_is_refused_with_how_to_pad_on_the_left(demo):
    edited = ii.edit(demo, "model.transformer.h[1].output[:, -1] *= 0.5", name="half")
    tokenizer = demo.tokenizer
    side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "right"
        right = tokenizer(CLEAN, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    with pytest.raises(InputError, match="padding_side = 'left'") as info:
        with torch.no_grad():
            edited.module(**right)
    assert "row 1" in str(info.value) and "model.prepare(prompts)" in str(info.value)
    with torch.no_grad():                        # the edit goes on working, on left padding
        got = edited.module(**demo.prepare(CLEAN).kwargs).logits[:, -1]
    half = clone_out(lambda x: x[:, -1].mul_(0.5))
    for i, text in enumerate(CLEAN):
        with Hand([(demo.module.transformer.h[1], "post", half)]), torch.no_grad():
            want = demo.module(ids(demo, text)).logits[0, -1]
        torch.testing.assert_close(got[i], want, atol=TOL, rtol=TOL)
    ii.clear_edits(edited)


def test_methods_that_read_the_model_s_own_parts_name_the_edit_they_cannot_see(demo):
    """Edge attribution checks that the components' writes add up to the stream, and an
    attribution graph freezes the model's own parts: an edit that writes what no component
    wrote (a steering vector) is named in the refusal, never folded in silently."""
    vec = torch.ones(demo.module.config.n_embd)
    steered = ii.edit(demo, "model.transformer.h[1].output[:, -1] += vec", name="steer",
                      namespace={"vec": vec})
    metric = ii.logit_diff("Mary", "John")
    with pytest.raises(InputError, match=r"the edits \['steer'\] \(ii.edit\) write to it what "
                                         r"no component wrote"):
        ii.edge_attribution(steered, CLEAN[0], CORRUPTED[0], metric)
    with pytest.raises(InputError, match=r"does not run the edits \['steer'\]"):
        ii.attribution_graph(steered, CLEAN[0], "demo", target=metric)
