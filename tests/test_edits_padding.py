"""Batches of an edited model (issue 30) from outside the package: the demo's evaluation
(``demo/evaluate.py`` pads on the left and reads ``[:, -1]``) and a batch padded on the right.
Each equals plain PyTorch hooks on the original model, one prompt at a time."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.demo import evaluate as ev
from test_edits_sweeps import splice, vec  # noqa: F401  (fixtures)
from test_edits_sweeps import CLEAN, KINDS, TOL, Hand, ids, kind_of

PROMPTS = [*CLEAN, "Then , Mary and John had"]     # four lengths


def last_by_hand(model, hand, prompts):
    """``[prompts, vocab]``: each prompt alone, the edit's plain hooks on, its last logits."""
    with Hand(hand), torch.no_grad():
        return torch.cat([model.module(ids(model, p)).logits[:, -1] for p in prompts])


def test_last_logits_pads_on_the_left_and_equals_each_prompt_alone(demo):
    assert len({ids(demo, p).shape[1] for p in PROMPTS}) == len(PROMPTS)
    got = ev.last_logits(demo.module, demo.tokenizer, PROMPTS)
    torch.testing.assert_close(got, last_by_hand(demo, [], PROMPTS), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_last_logits_of_an_edited_model_equals_plain_hooks_per_prompt(demo, vec, splice, kind):
    cell, hand = kind_of(demo, vec, splice, kind)
    edited = ii.edit(demo, cell, name=kind, namespace={"vec": vec})
    try:
        got = ev.last_logits(edited.module, demo.tokenizer, PROMPTS)
        want = last_by_hand(demo, hand, PROMPTS)
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
        assert (got - last_by_hand(demo, [], PROMPTS)).abs().max() > 1e-3   # the edit matters
    finally:
        ii.clear_edits(edited)


def test_the_demo_evaluation_of_an_edited_model(demo):
    """The name mover ablated for good: IOI scores of the edited model drop, the original's
    stay what they were."""
    before = ev.ioi_scores(demo.module, demo.tokenizer)
    ablated = ii.edit(demo, "model.transformer.h[1].attn.c_proj.input[:, :, 96:128] = 0",
                      name="ablated")
    try:
        after = ev.ioi_scores(ablated.module, demo.tokenizer)
    finally:
        ii.clear_edits(ablated)
    assert after[1] < before[1] - 1.0
    assert ev.ioi_scores(demo.module, demo.tokenizer) == before
