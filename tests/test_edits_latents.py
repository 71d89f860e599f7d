"""Latent sweeps of an edited model (issue 30): ``ii.patch_sweep(edited, ..., site="sae")``
runs whole forwards of the edited model, so an edit of any kind (several modules, positions
counted from each prompt's start, a head, a pattern, a latent of the splice) applies as it
does at any forward. Each equals plain PyTorch hooks on the original model, one prompt at a
time: the edit by hand, then the cell's latent set to the clean run's value."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from conftest import PROMPT
from test_edits_sweeps import splice, vec  # noqa: F401  (fixtures)
from test_edits_sweeps import (CLEAN, CORRUPTED, KINDS, PAIRS, TOL, Hand, clone_out, ids,
                               kind_of, mary_john)


def latents_of(model, splice, hand, text):
    """The splice's latents ``[1, T, m]`` in the prompt's run with the edit's hooks."""
    seen = {}

    def keep(x):
        seen["x"] = x.clone()
    with Hand([*hand, (splice.latents, "post", clone_out(keep))]), torch.no_grad():
        model.module(ids(model, text))
    return seen["x"]


def latent_oracle(model, splice, hand, latents):
    """``[latent, pos, prompt]``: the corrupted run with the edit's hooks and the latent at
    the position set to its clean value, one prompt at a time (a batch position that is a
    shorter prompt's padding changes nothing of it)."""
    length = max(ids(model, t).shape[1] for t in CLEAN)
    out = torch.zeros(len(latents), length, len(PAIRS))
    for i, (clean, corrupt) in enumerate(PAIRS):
        cut = length - ids(model, clean).shape[1]
        source = latents_of(model, splice, hand, clean)
        with Hand(hand), torch.no_grad():
            plain = float(mary_john(model, model.module(ids(model, corrupt)).logits))
        out[:, :cut, i] = plain
        for a, j in enumerate(latents):
            for p in range(cut, length):
                def write(x, q=p - cut, j=j):
                    x[:, q, j] = source[:, q, j]
                with Hand([*hand, (splice.latents, "post", clone_out(write))]), \
                        torch.no_grad():
                    out[a, p, i] = float(mary_john(model, model.module(
                        ids(model, corrupt)).logits))
    return out


def moving_latents(model, splice, k=3):
    """Latents whose clean and corrupted values differ most (cells that change the metric),
    and latent 2 (the one the latent edit zeroes)."""
    diff = sum((latents_of(model, splice, [], c)[0] - latents_of(model, splice, [], k_)[0]
                ).abs().sum(0) for c, k_ in PAIRS)
    return sorted({2, *diff.topk(k).indices.tolist()})


@pytest.mark.parametrize("kind", KINDS)
def test_a_latent_sweep_of_the_edited_model_equals_plain_hooks_per_prompt(demo, vec, splice,
                                                                          kind):
    cell, hand = kind_of(demo, vec, splice, kind)
    latents = moving_latents(demo, splice)
    edited = ii.edit(demo, cell, name=kind, namespace={"vec": vec})
    try:
        got = ii.patch_sweep(edited, CLEAN, CORRUPTED, ii.logit_diff("Mary", "John"),
                             site="sae", latents=latents)
        want = latent_oracle(demo, splice, hand, latents)
        torch.testing.assert_close(got.prompt_values, want, atol=TOL, rtol=TOL)
        plain = ii.patch_sweep(demo, CLEAN, CORRUPTED, ii.logit_diff("Mary", "John"),
                               site="sae", latents=latents)
        assert (got.prompt_values - plain.prompt_values).abs().max() > 1e-3  # the edit matters
        assert (got.raw - got.raw[0, 0]).abs().max() > 1e-3    # the cells matter
    finally:
        ii.clear_edits(edited)


def test_an_unedited_latent_sweep_keeps_the_staircase(demo, splice, monkeypatch):
    from ipy_intervene.sweep.staircase import Engine

    def refuse(self, cells):
        raise AssertionError("an unedited model ran whole forwards")
    monkeypatch.setattr(Engine, "_whole", refuse)
    ii.patch_sweep(demo, CLEAN, CORRUPTED, ii.logit_diff("Mary", "John"), site="sae",
                   latents=[0, 1])


def test_causal_tracing_of_latents_of_an_edited_model_equals_the_staircase_on_hand_hooks(
        demo, vec, splice):
    """Noised runs of the edited model (the noise added again in each whole forward) equal
    the block-by-block engine on the original model with the edit as plain hooks."""
    cell = "model.transformer.h[1].output[:, -1] += 3 * vec"
    hand = [(demo.module.transformer.h[1], "post",
             clone_out(lambda x: x[:, -1].__iadd__(3 * vec)))]
    edited = ii.edit(demo, cell, name="steer", namespace={"vec": vec})
    options = dict(method="noise", subject="Mary", samples=3, site="sae",
                   latents=moving_latents(demo, splice))
    try:
        got = ii.patch_sweep(edited, PROMPT, None, ii.logit_diff("Mary", "John"), **options)
        with Hand(hand):
            want = ii.patch_sweep(demo, PROMPT, None, ii.logit_diff("Mary", "John"), **options)
        torch.testing.assert_close(got.raw, want.raw, atol=TOL, rtol=TOL)
        assert (got.raw - got.raw[0, 0]).abs().max() > 1e-3
    finally:
        ii.clear_edits(edited)


def test_a_module_of_an_edit_called_on_its_own(demo, vec):
    """Ad hoc, outside a forward of the whole model: a one-module edit counted from the end
    runs on the call as plain hooks do; one that spans modules, or counts from the start,
    is refused and says why."""
    from ipy_intervene.errors import SiteError

    block = demo.module.transformer.h[1]
    hidden = torch.randn(2, 5, 128)
    steer = ii.edit(demo, "model.transformer.h[1].output[:, -1] += 3 * vec", name="steer",
                    namespace={"vec": vec})
    try:
        with torch.no_grad():
            got = steer.module.transformer.h[1](hidden)
            want = block(hidden)
        want = (want[0] if isinstance(want, tuple) else want).clone()
        want[:, -1] += 3 * vec
        got = got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    finally:
        ii.clear_edits(steer)
    for kind in ("modules", "from_start"):
        cell, _ = kind_of(demo, vec, None, kind)
        edited = ii.edit(demo, cell, name=kind, namespace={"vec": vec})
        try:
            with pytest.raises(SiteError, match="reads or changes 2 modules"), \
                    torch.no_grad():
                edited.module.transformer.h[2](hidden)
        finally:
            ii.clear_edits(edited)
    start = ii.edit(demo, "model.transformer.h[1].output[:, 3] = 0", name="start")
    try:
        with pytest.raises(SiteError, match="counted from the start"), torch.no_grad():
            start.module.transformer.h[1](hidden)
    finally:
        ii.clear_edits(start)
