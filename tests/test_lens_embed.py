"""The lens view's embedding row, and first-token labels shown whole when there is room."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from ipy_intervene.widgets.attention_view import AttentionView
from ipy_intervene.widgets.lens_view import LensView
from conftest import PROMPT

LONG = " ".join([PROMPT + " Mary ."] * 3)


@torch.no_grad()
def test_the_embedding_row_is_block_0s_input_decoded(demo):
    seen = []
    m = demo.module
    handle = m.transformer.h[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True)
    try:
        m(**demo.tokenizer(PROMPT, return_tensors="pt"))
    finally:
        handle.remove()
    expected = m.lm_head(m.transformer.ln_f(seen[0]))[0].softmax(-1)
    result = ii.lens(demo, PROMPT)
    torch.testing.assert_close(result.embedding, expected, rtol=0, atol=1e-6)
    assert result.top("embed", 3, 1)[0][0] == demo.tokenizer.decode([int(expected[3].argmax())])
    c = ii.cache(demo, [PROMPT], sites=["resid_pre", "resid_post"])
    torch.testing.assert_close(ii.lens(demo, c).embedding, expected, rtol=0, atol=1e-5)


def test_the_view_has_an_embed_row_below_the_layers(demo):
    view = LensView(ii.lens(demo, PROMPT))
    heat = view.figure.data[0]
    assert heat.y == ("embed", "L0", "L1", "L2", "L3")            # data rows = plot rows
    assert view.figure.layout.yaxis.categoryarray == ("embed", "L0", "L1", "L2", "L3")
    view._on_click(heat, SimpleNamespace(point_inds=[(2, 5)]), None)
    assert (view.layer.value, view.pos.value) == (1, 5) and view.figure.data[1].y == ("L1",)
    view._on_click(heat, SimpleNamespace(point_inds=[(0, 2)]), None)
    assert view.layer.value == "embed" and view.figure.data[1].y == ("embed",)
    assert "after the embeddings" in view.detail.value
    assert view._shapes()[0]["y0"] == -0.5                   # the bottom row
    view.layer.value = 2
    assert view._shapes()[0]["y0"] == 2.5 and "after layer 2" in view.detail.value
    assert "embed" in view._repr_mimebundle_()["image/svg+xml"]


def test_published_streams_have_no_embedding_row(demo):
    ns = {"model": demo}
    ii.trace(demo, "acts = [model.transformer.h[l].output for l in range(4)]", PROMPT,
             namespace=ns)
    result = ii.lens(demo, ns["acts"])
    assert result.embedding is None and LensView(result).figure.data[0].y[-1] == "L3"
    with pytest.raises(InputError, match="no embedding row"):
        result.top("embed", 0)


def test_a_long_first_token_label_is_whole_when_there_is_room(demo):
    lens = LensView(ii.lens(demo, PROMPT))
    assert lens.figure.layout.xaxis.ticktext[0] == "&lt;|endoftext|> (0)"
    assert "&lt;|endoftext|&gt; (0)" in lens._repr_mimebundle_()["image/svg+xml"]
    attention = AttentionView(ii.attention_patterns(demo, PROMPT))
    assert attention.figure.layout.xaxis.ticktext[0] == "&lt;|endoftext|> (0)"
    assert attention.figure.layout.yaxis.ticktext[0] == "&lt;|endoftext|> (0)"
    crowded = LensView(ii.lens(demo, LONG))                   # 51 positions: cut, as before
    assert crowded.figure.layout.xaxis.ticktext[0] == "&lt;|endoftext|>…"
