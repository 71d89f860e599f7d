"""Sweeps inside attention, path patching and AtP* of an edited model (issue 30), for the
five edit kinds, on three prompts of different lengths (the package pads on the left).

- ``head_q``/``head_k``/``head_v``/``head_pattern``: against attention written by hand in
  plain PyTorch (``attention_oracle``) with the edit as plain hooks, one prompt at a time.
- ``method="path"`` and ``method="atp*"``: the edited model's batch against the same method
  on the original model with the edit as plain hooks, one prompt at a time (each prompt alone
  has no padding, so the plain hooks see its own positions; both methods run whole forwards).
"""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from attention_oracle import logits_by_hand
from test_edits_sweeps import splice, vec  # noqa: F401  (fixtures)
from test_edits_sweeps import CLEAN, CORRUPTED, KINDS, PAIRS, TOL, Hand, kind_of

METRIC = ii.logit_diff("Mary", "John")


@pytest.fixture(params=KINDS)
def edited(request, demo, vec, splice):
    """(the edited model, the edit's plain hooks); the edit cleared afterwards."""
    cell, hand = kind_of(demo, vec, splice, request.param)
    made = ii.edit(demo, cell, name=request.param, namespace={"vec": vec})
    yield made, hand
    ii.clear_edits(made)


def by_hand(model, hand, text, patch=None):
    """(metric, every layer's q/k/v/pattern) of one prompt: attention by hand, the edit's
    plain hooks on."""
    with Hand(hand), torch.no_grad():
        logits, seen = logits_by_hand(model, [text], patch)
    return float(METRIC.bind(model, 1)(logits)), seen


def head_oracle(model, hand, name):
    """``[layer, head, prompt]``: the corrupted run with one head's clean value (every
    position), one prompt at a time."""
    out = torch.zeros(4, 4, len(PAIRS))
    for i, (clean, corrupt) in enumerate(PAIRS):
        _, source = by_hand(model, hand, clean)
        for layer in range(4):
            for head in range(4):
                def patch(l, n, x, layer=layer, head=head):
                    if l != layer or n != name:
                        return x
                    x = x.clone()
                    x[:, head] = source[layer][name][:, head]
                    return x
                out[layer, head, i] = by_hand(model, hand, corrupt, patch)[0]
    return out


@pytest.mark.parametrize("site", ["head_q", "head_k", "head_v", "head_pattern"])
def test_head_site_sweeps_of_the_edited_model_equal_attention_by_hand(demo, edited, site):
    model, hand = edited
    got = ii.patch_sweep(model, CLEAN, CORRUPTED, METRIC, site=site)
    assert got.dims == ("layer", "head")
    want = head_oracle(demo, hand, site.removeprefix("head_"))
    torch.testing.assert_close(got.prompt_values, want, atol=TOL, rtol=TOL)
    assert (want - want[0, 0]).abs().max() > 1e-3      # the cells matter


def per_prompt(model, hand, **options):
    """``prompt_values`` of the method on each pair alone, the edit's plain hooks on (the
    site map's one-time check runs first, without them: it would see the edit)."""
    from ipy_intervene.arch.sites import adapter_for

    adapter_for(model)
    with Hand(hand):
        return [ii.patch_sweep(model, clean, corrupt, METRIC, **options).prompt_values[..., 0]
                for clean, corrupt in PAIRS]


@pytest.mark.parametrize("options", [dict(method="path"),
                                     dict(method="path", receivers=[(3, 0), (3, 2)]),
                                     dict(method="atp*", site="head_out"),
                                     dict(method="atp*", site="mlp_out")],
                         ids=["path_logits", "path_q", "atp_heads", "atp_mlp"])
def test_path_patching_and_atp_star_of_the_edited_model_equal_plain_hooks_per_prompt(
        demo, edited, options):
    model, hand = edited
    got = ii.patch_sweep(model, CLEAN, CORRUPTED, METRIC, **options)
    for i, want in enumerate(per_prompt(demo, hand, **options)):
        mine = got.prompt_values[..., i]
        if "pos" in got.dims:     # a prompt alone has its own positions: the batch's last
            assert got.dims[-1] == "pos"
            mine = mine[..., mine.shape[-1] - want.shape[-1]:]
        torch.testing.assert_close(mine, want, atol=TOL, rtol=TOL)
    plain = ii.patch_sweep(demo, CLEAN, CORRUPTED, METRIC, **options)
    assert (got.prompt_values - plain.prompt_values).abs().max() > 1e-4   # the edit matters
