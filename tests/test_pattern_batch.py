"""ii.attention_patterns on a batch: each prompt's patterns, unpadded, equal its patterns read
alone; scores and top heads over the batch."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from ipy_intervene.patterns import PatternBatch, PatternResult
from attention_oracle import logits_by_hand
from conftest import PROMPT, SHORT, checksum, hook_count

TEXTS = [PROMPT, SHORT, "Mary had", PROMPT + " the"] * 4            # 16 prompts, 4 lengths


def test_a_batch_of_16_gives_each_prompt_its_own_patterns(attention_case):
    _, _, model = attention_case
    before = hook_count(model.module), checksum(model.module)
    batch = ii.attention_patterns(model, TEXTS, batch_size=5)
    assert (hook_count(model.module), checksum(model.module)) == before
    assert isinstance(batch, PatternBatch) and len(batch) == 16
    for i in (0, 1, 2, 7):
        _, seen = logits_by_hand(model, [TEXTS[i]])
        n = len(model.to_tokens(TEXTS[i])[0])
        assert batch[i].patterns.shape == (3, 4, n, n) and len(batch[i].tokens) == n
        for layer in range(3):
            torch.testing.assert_close(batch[i].patterns[layer], seen[layer]["pattern"][0],
                                       rtol=0, atol=1e-5)


def test_one_prompt_still_gives_a_pattern_result(demo):
    one = ii.attention_patterns(demo, PROMPT)
    assert isinstance(one, PatternResult)
    both = ii.attention_patterns(demo, [PROMPT, SHORT])
    torch.testing.assert_close(both[0].patterns, one.patterns, rtol=0, atol=1e-6)
    assert both[0].tokens == one.tokens


def test_scores_and_top_heads_over_the_batch(demo):
    batch = ii.attention_patterns(demo, [PROMPT, SHORT, "Mary and John had"])
    scores = batch.scores(query=-1, key="Mary")
    assert scores.shape == (3, 4, 4)
    for i, p in enumerate(batch):
        k = [t.rsplit(" (", 1)[0] for t in p.tokens].index("Mary")
        assert torch.equal(scores[i], p.patterns[:, :, -1, k])
    name, value = batch.top_heads(query=-1, key="Mary", k=1)[0]
    layer, head = int(name[1]), int(name[3])
    assert value == pytest.approx(float(scores[:, layer, head].mean()))
    assert value == pytest.approx(float(scores.mean(0).max()))
    with pytest.raises(InputError, match="prompt 1: 'store' is not a token"):
        batch.scores(key="store")
    with pytest.raises(InputError, match="not in this batch of 3"):
        batch.show(prompt=3)
    assert "svg" in "".join(batch.show(prompt=1)._repr_mimebundle_())
