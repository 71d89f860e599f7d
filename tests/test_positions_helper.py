"""ii.positions: (prompt, token) -> the padded position in a left-padded batch, checked against
each prompt run alone."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from ipy_intervene.model.positions import Positions, positions
from conftest import PROMPT, SHORT

TEXTS = [PROMPT, SHORT, "Mary had"]


@torch.no_grad()
def alone(model, text, layer=1):
    """Block ``layer``'s output of one prompt, unpadded, with a plain hook."""
    seen = []
    handle = model.module.transformer.h[layer].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        model.module(**model.tokenizer(text, return_tensors="pt"))
    finally:
        handle.remove()
    return seen[0][0]


def test_positions_index_a_traced_batch_like_each_prompt_alone(demo):
    ns = {"model": demo}
    ii.trace(demo, "h = model.transformer.h[1].output", TEXTS, namespace=ns)
    h = ns["h"][0] if isinstance(ns["h"], tuple) else ns["h"]
    pos = positions(demo, TEXTS)
    assert pos.width == h.shape[1] and pos.lengths == [len(alone(demo, t)) for t in TEXTS]
    for i, text in enumerate(TEXTS):
        mine = alone(demo, text)
        for j in (0, 1, -1, pos.lengths[i] // 2):
            torch.testing.assert_close(h[i, pos(i, j)], mine[j], rtol=0, atol=1e-5)
        torch.testing.assert_close(pos.unpad(h, i), mine, rtol=0, atol=1e-5)
    last = pos.of(-1)
    assert last.tolist() == [pos.width - 1] * 3
    mary = pos.of("Mary", occurrence=0)
    for i, text in enumerate(TEXTS):
        j = [w.strip() for w in pos.tokens(i)].index("Mary")
        torch.testing.assert_close(h[i, mary[i]], alone(demo, text)[j], rtol=0, atol=1e-5)


def test_text_tokens_match_with_or_without_the_space(demo):
    pos = positions(demo, TEXTS)
    assert pos(1, " John") == pos(1, "John") == pos.pad[1] + pos.tokens(1).index("John")


def test_ambiguous_absent_and_out_of_range_tokens_are_errors(demo):
    pos = positions(demo, TEXTS)
    with pytest.raises(InputError, match="occurs 2 times in prompt 0"):
        pos(0, "John")
    assert pos(0, "John", occurrence=-1) > pos(0, "John", occurrence=0)
    with pytest.raises(InputError, match="is not a token of prompt 2"):
        pos(2, "John")
    with pytest.raises(InputError, match="outside prompt 2"):
        pos(2, 5)
    with pytest.raises(InputError, match="not in this batch of 3"):
        pos(3, 0)
    with pytest.raises(InputError, match="occurrence 2 does not exist"):
        pos(0, "John", occurrence=2)


def test_a_mask_that_is_not_left_padding_is_refused():
    with pytest.raises(InputError, match="not left padding"):
        Positions(torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, 0, 1]]))


def test_a_cache_and_positions_agree(demo):
    c = ii.cache(demo, TEXTS, sites="resid_post", layers=[1])
    pos = positions(demo, TEXTS)
    x, mask = c.padded("resid_post", 1)
    assert torch.equal(mask, pos.mask)
    for i in range(3):
        assert torch.equal(x[i, pos(i, 0)], c["resid_post", 1][i][0])
