"""The shipped demo weights really do IOI, factual recall and induction (no retraining)."""

from __future__ import annotations

import pytest

from ipy_intervene.demo import data
from ipy_intervene.demo.evaluate import evaluate


@pytest.fixture(scope="module")
def quality(demo):
    return evaluate(demo.module, demo.tokenizer)


def test_ioi_on_held_out_name_pairs(quality):
    assert quality.ioi_accuracy >= 0.95
    assert quality.ioi_logit_diff >= 2.0


def test_factual_recall(quality):
    assert quality.fact_accuracy >= 0.95


def test_induction(quality):
    assert quality.induction_loss_ratio >= 4.0


def test_held_out_pairs_are_never_trained():
    train, held_out = data.name_pairs()
    assert held_out and not set(train) & set(held_out)
    assert tuple(sorted(data.SHOWCASE_PAIR)) in train


def test_weights_are_small():
    from ipy_intervene.model.envoys import DEMO_DIR

    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir()) < 10 * 2**20


def test_vocabulary_covers_every_task_word(demo):
    unk = demo.tokenizer.unk_token_id
    texts = [data.ioi_example(__import__("random").Random(0), data.name_pairs()[0])[0],
             data.fact_example(__import__("random").Random(0), data.make_facts())[0]]
    for text in texts:
        assert unk not in demo.tokenizer(text).input_ids
