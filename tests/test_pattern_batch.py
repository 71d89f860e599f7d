"""ii.attention_patterns on a batch: each prompt's patterns, unpadded, equal its patterns read
alone; scores and top heads over the batch."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from ipy_intervene.analysis.patterns import PatternBatch, PatternResult
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


# -- token ids (issue 27): read like a trace's INPUT -----------------------------------------

ID_TEXTS = [PROMPT, SHORT, "Mary had"]                              # 15, 7 and 3 tokens


def _alone(model, ids: torch.Tensor) -> torch.Tensor:
    """The oracle: plain PyTorch, eager attention, one prompt alone (no padding), every
    layer's ``output_attentions``: ``[layer, head, query, key]``."""
    import copy

    module = copy.deepcopy(model.module)
    module.set_attn_implementation("eager")
    with torch.no_grad():
        out = module(input_ids=ids[None], output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]).float()


def test_a_list_of_id_tensors_of_different_lengths_reads_each_prompt_alone(demo):
    ids = [demo.to_tokens(t)[0] for t in ID_TEXTS]
    assert len({len(i) for i in ids}) == 3
    before = hook_count(demo.module), checksum(demo.module)
    batch = ii.attention_patterns(demo, ids)
    assert (hook_count(demo.module), checksum(demo.module)) == before
    assert isinstance(batch, PatternBatch) and len(batch) == 3
    texts = ii.attention_patterns(demo, ID_TEXTS)
    for i, row in enumerate(ids):
        n = len(row)
        assert batch[i].patterns.shape == (4, 4, n, n) and batch[i].layers == [0, 1, 2, 3]
        torch.testing.assert_close(batch[i].patterns, _alone(demo, row), rtol=0, atol=1e-5)
        assert batch[i].tokens == texts[i].tokens
        torch.testing.assert_close(batch[i].patterns, texts[i].patterns, rtol=0, atol=1e-6)
    only = ii.attention_patterns(demo, tuple(ids), layers=[2])       # a tuple, one layer
    torch.testing.assert_close(only[1].patterns[0], _alone(demo, ids[1])[2], rtol=0, atol=1e-5)
    scores = batch.scores(query=-1, key="Mary")
    assert scores.shape == (3, 4, 4)


def test_a_2d_id_tensor_is_a_batch_and_one_row_is_a_prompt(demo):
    rows = torch.stack([demo.to_tokens(SHORT)[0], demo.to_tokens("Mary and John went to the")[0]])
    assert rows.shape == (2, 7)
    batch = ii.attention_patterns(demo, rows)
    assert isinstance(batch, PatternBatch) and len(batch) == 2
    for i in range(2):
        torch.testing.assert_close(batch[i].patterns, _alone(demo, rows[i]), rtol=0, atol=1e-5)
    one = ii.attention_patterns(demo, rows[:1])
    assert isinstance(one, PatternResult)
    torch.testing.assert_close(one.patterns, _alone(demo, rows[0]), rtol=0, atol=1e-5)
    alone = ii.attention_patterns(demo, rows[1])                     # 1-D: one prompt
    assert isinstance(alone, PatternResult)          # batching changes float order: 1e-5
    torch.testing.assert_close(alone.patterns, batch[1].patterns, rtol=0, atol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda ids: torch.stack([ids, ids])[None], r"int64 tensor of shape \[1, 2, 3\] is not "
                                                r"token ids: token ids are an integer tensor"),
    (lambda ids: ids.float(), r"float32 tensor of shape \[3\] is neither token ids nor "
                              r"published patterns"),
    (lambda ids: torch.stack([ids, ids]).float(), r"shape \[2, 3\] is neither token ids"),
    (lambda ids: [ids.float(), ids[:2].float()], r"2 float tensors of shapes \[3\], \[2\]"),
    (lambda ids: [ids, ids.float()], "mixes float and integer tensors"),
    (lambda ids: [ids, torch.stack([ids, ids])], r"item 1 of the INPUT list has shape \[2, 3\]"),
    (lambda ids: [ids, ids[:0]], r"item 1 of the INPUT list has shape \[0\]"),
])
def test_ids_that_are_not_prompts_are_a_clear_error(demo, make, match):
    ids = demo.to_tokens("Mary had")[0]
    before = hook_count(demo.module)
    with pytest.raises(InputError, match=match):
        ii.attention_patterns(demo, make(ids))
    assert hook_count(demo.module) == before
