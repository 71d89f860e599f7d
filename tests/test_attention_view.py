"""Attention patterns and the attention view: every head's pattern against attention computed
by hand in plain PyTorch (GPT-2, NeoX and Llama/GQA shapes, eager and SDPA), patterns a
``%%trace`` cell published, and the view's pickers, clicks, errors and mime bundle."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from ipy_intervene.analysis.patterns import PatternResult, attention_patterns
from ipy_intervene.widgets.attention_view import TILE_MAX, AttentionView, tiles, visible
from attention_oracle import logits_by_hand
from conftest import PROMPT, hook_count, tiny_model


@pytest.fixture
def case(attention_case):
    return attention_case


@pytest.fixture(scope="module")
def demo_patterns(demo) -> PatternResult:
    return attention_patterns(demo, PROMPT)


def _tile_cell(view: AttentionView, head: int, row: int = 0, col: int = 0) -> tuple[int, int]:
    """Grid coordinates of cell (row, col) of ``head``'s thumbnail."""
    size = view._tile + 1
    r, c = divmod(head, view.cols)
    return r * size + row, c * size + col


def _z(view: AttentionView) -> torch.Tensor:
    """The big heatmap's data as a tensor (NaN where it is blank)."""
    return torch.tensor([[float("nan") if v is None else v for v in row]
                         for row in view.figure.data[0].z])


def _assert_shows(view: AttentionView, plane: torch.Tensor) -> None:
    z = _z(view)
    blank = z.isnan()
    assert torch.equal(blank, torch.ones_like(blank).triu(1) & (plane == 0))
    assert torch.equal(z[~blank], plane[~blank])


# -- exact patterns ------------------------------------------------------------------------


@torch.no_grad()
def test_patterns_equal_attention_by_hand(case):
    arch, impl, model = case
    hooks_before = hook_count(model.module)
    result = attention_patterns(model, PROMPT)
    _, seen = logits_by_hand(model, [PROMPT])
    assert result.layers == [0, 1, 2]
    assert result.patterns.shape == (3, 4, len(result.tokens), len(result.tokens))
    for layer in range(3):
        torch.testing.assert_close(result.patterns[layer], seen[layer]["pattern"][0],
                                   rtol=0, atol=1e-5, msg=f"layer {layer}")
    torch.testing.assert_close(result.patterns.sum(-1), torch.ones(result.patterns.shape[:-1]),
                               rtol=0, atol=1e-5)
    future = torch.ones(15, 15, dtype=torch.bool).triu(1)
    assert bool((result.patterns[..., future] == 0).all())        # causal: no future key
    assert bool((result.patterns[..., ~future] > 0).all())
    assert model.module.config._attn_implementation == impl      # the model is as it was
    assert hook_count(model.module) == hooks_before


@torch.no_grad()
def test_patterns_are_the_eager_models_own_under_sdpa(demo):
    module = tiny_model("llama", len(demo.tokenizer))
    module.set_attn_implementation("sdpa")
    model = ii.wrap(module, demo.tokenizer)
    result = attention_patterns(model, PROMPT)
    module.set_attn_implementation("eager")
    out = module(model.to_tokens(PROMPT), output_attentions=True)
    for layer in range(3):
        assert torch.equal(result.patterns[layer], out.attentions[layer][0])


def test_a_subset_of_layers_reads_those_layers(demo, demo_patterns):
    some = attention_patterns(demo, PROMPT, layers=[-1, 1])
    assert some.layers == [3, 1]
    assert torch.equal(some.patterns, demo_patterns.patterns[[3, 1]])
    assert torch.equal(some.pattern(1, 2), demo_patterns.pattern(1, 2))


def test_tokens_label_the_prompt(demo, demo_patterns):
    assert demo_patterns.tokens[2] == "Mary (2)" and len(demo_patterns.tokens) == 15
    assert demo_patterns.query_tokens == demo_patterns.tokens


def test_top_heads_rank_heads_by_query_to_key_probability(demo_patterns):
    top = demo_patterns.top_heads(query=-1, key="Mary", k=3)
    scores = demo_patterns.patterns[:, :, -1, 2]
    best = scores.flatten().topk(3)
    assert [v for _, v in top] == best.values.tolist()
    layer, head = divmod(int(best.indices[0]), 4)
    assert top[0][0] == f"L{layer}H{head}"
    assert demo_patterns.top_heads(query=14, key="Mary (2)", k=3) == top


# -- published patterns --------------------------------------------------------------------


def _published(demo, body: str) -> dict:
    ns = {"model": demo}
    ii.trace(demo, body, PROMPT, namespace=ns)
    return ns


def test_published_patterns_equal_the_prompts(demo, demo_patterns):
    ns = _published(demo, "pats = [model.transformer.h[l].attn.pattern.output for l in "
                          "range(4)]\none = model.transformer.h[2].attn.pattern.output[0]")
    every = attention_patterns(demo, ns["pats"], tokens=PROMPT)
    assert torch.equal(every.patterns, demo_patterns.patterns)
    assert every.tokens == demo_patterns.tokens and every.layers == [0, 1, 2, 3]
    one = attention_patterns(demo, ns["one"], tokens=demo.to_str_tokens(PROMPT), layers=[2])
    assert one.layers == [2] and torch.equal(one.pattern(2, 1), demo_patterns.pattern(2, 1))


def test_published_patterns_without_tokens_say_pos(demo):
    ns = _published(demo, "p = model.transformer.h[0].attn.pattern.output")
    result = attention_patterns(demo, ns["p"])
    assert result.tokens[:2] == ["pos 0", "pos 1"]


def test_published_scores_are_not_taken_for_probabilities(demo):
    ns = _published(demo, "q = model.transformer.h[0].attn.q.output\n"
                          "p = model.transformer.h[0].attn.pattern.output")
    with pytest.raises(InputError, match="not attention probabilities"):
        attention_patterns(demo, ns["p"] * 2)
    with pytest.raises(InputError, match=r"expected \[head, query, key\]"):
        attention_patterns(demo, ns["q"][0, 0])
    with pytest.raises(InputError, match="16 tokens for 15 key positions"):
        attention_patterns(demo, ns["p"], tokens=["x"] * 16)
    with pytest.raises(InputError, match="must name each of the 1"):
        attention_patterns(demo, ns["p"], layers=[0, 1])


def test_a_generation_steps_pattern_labels_its_query_with_the_last_token(demo, demo_patterns):
    last_row = demo_patterns.patterns[:, :, -1:, :]          # [layer, head, 1, key]
    result = attention_patterns(demo, list(last_row), tokens=PROMPT)
    assert result.query_tokens == ["to (14)"]
    view = result.show(layer=1, head=0)
    _assert_shows(view, demo_patterns.pattern(1, 0)[-1:])


# -- errors --------------------------------------------------------------------------------


def test_layer_and_head_out_of_range_name_what_exists(demo, demo_patterns):
    with pytest.raises(InputError, match=r"layer 7 is not in this result: it has layers 0\.\.3"):
        demo_patterns.pattern(7, 0)
    with pytest.raises(InputError, match=r"4 heads \(0\.\.3\)"):
        demo_patterns.pattern(0, 4)
    with pytest.raises(InputError, match=r"4 heads"):
        demo_patterns.show(layer=0, head=9)
    with pytest.raises(InputError, match=r"it has 4 layers \(0\.\.3"):
        attention_patterns(demo, PROMPT, layers=[4])
    with pytest.raises(InputError, match="it has layers 3, 1"):
        attention_patterns(demo, PROMPT, layers=[3, 1]).pattern(0, 0)
    with pytest.raises(InputError, match="'Bob' is not a token"):
        demo_patterns.top_heads(key="Bob")
    with pytest.raises(InputError, match="occurs more than once"):
        demo_patterns.top_heads(key="John")


# -- the view ------------------------------------------------------------------------------


def test_pickers_show_the_chosen_head(demo_patterns):
    view = AttentionView(demo_patterns)
    assert (view.layer.value, view.head.value) == (3, 0)
    _assert_shows(view, demo_patterns.pattern(3, 0))
    for layer, head in ((0, 2), (2, 3), (1, 1)):
        view.layer.value, view.head.value = layer, head
        _assert_shows(view, demo_patterns.pattern(layer, head))
        assert f"L{layer}H{head}" in view.figure.layout.title.text
        assert f"L{layer}H{head}" in view.detail.value
    view.select(layer=0, head=-1)
    _assert_shows(view, demo_patterns.pattern(0, 3))


def test_the_grid_holds_every_head_of_the_layer(demo_patterns):
    view = AttentionView(demo_patterns, layer=2)
    z = torch.tensor([[float("nan") if v is None else v for v in row]
                      for row in view.heads.data[0].z])
    for head in range(4):
        r, c = _tile_cell(view, head)
        torch.testing.assert_close(z[r:r + 15, c:c + 15], demo_patterns.pattern(2, head),
                                   rtol=0, atol=0)
    view.layer.value = 0
    r, c = _tile_cell(view, 3, 14, 0)
    assert view.heads.data[0].z[r][c] == float(demo_patterns.pattern(0, 3)[14, 0])


def test_clicking_a_grid_cell_picks_that_head(demo_patterns):
    view = AttentionView(demo_patterns, layer=1, head=0)
    outline = view.heads.layout.shapes[0]
    view._on_grid_click(view.heads.data[0], SimpleNamespace(point_inds=[_tile_cell(view, 3, 4, 9)]),
                        None)
    assert view.head.value == 3 and view.layer.value == 1
    _assert_shows(view, demo_patterns.pattern(1, 3))
    assert view.heads.layout.shapes[0].x0 != outline.x0
    gap = (0, view._tile)                         # the blank column between heads 0 and 1
    view._on_grid_click(view.heads.data[0], SimpleNamespace(point_inds=[gap]), None)
    assert view.head.value == 3


def test_clicking_an_edge_cell_shows_that_query_to_key_probability(demo_patterns):
    view = AttentionView(demo_patterns, layer=1, head=2)
    view._on_cell_click(view.figure.data[0], SimpleNamespace(point_inds=[(14, 0)]), None)
    p = float(demo_patterns.pattern(1, 2)[14, 0])
    assert f"to (14) → &lt;|endoftext|&gt; (0): {p:.4f}" in view.detail.value
    shape = view.figure.layout.shapes[0]
    assert (shape.x0, shape.y0) == (-0.5, 13.5)


def test_the_layout_does_not_follow_the_selection(demo_patterns):
    view = AttentionView(demo_patterns)
    keep = ("xaxis", "yaxis", "height", "margin")
    before = {k: view.figure.layout[k].to_plotly_json() if hasattr(view.figure.layout[k],
              "to_plotly_json") else view.figure.layout[k] for k in keep}
    view.layer.value, view.head.value = 0, 3
    view._on_cell_click(view.figure.data[0], SimpleNamespace(point_inds=[(14, 14)]), None)
    after = {k: view.figure.layout[k].to_plotly_json() if hasattr(view.figure.layout[k],
             "to_plotly_json") else view.figure.layout[k] for k in keep}
    assert before == after


def test_hover_names_query_and_key_and_the_probability(demo_patterns):
    heat = AttentionView(demo_patterns).figure.data[0]
    assert heat.hovertemplate.startswith("query %{y} → key %{x}<br>p = %{z:.4f}")
    assert list(heat.x) == demo_patterns.tokens and list(heat.y) == demo_patterns.tokens


def test_bundle_has_the_widget_offline_html_and_text(demo_patterns):
    view = demo_patterns.show(layer=1, head=3)
    bundle = view._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/html"].count("Plotly.newPlot") == 2
    assert "ii-attention-detail" in bundle["text/html"]
    assert bundle["text/plain"].startswith("PatternResult(4 layers x 4 heads")
    assert "L1H3" in bundle["text/plain"]
    svg = bundle.get("image/svg+xml")
    assert svg is None or svg.lstrip().startswith("<svg")
    assert demo_patterns._repr_mimebundle_()["text/plain"].startswith("PatternResult(")


def test_long_prompts_pool_the_thumbnails(demo):
    planes = torch.rand(3, 50, 50).softmax(-1)
    values, heads, size = tiles(planes, cols=2)
    assert size == TILE_MAX and len(values) == 2 * (TILE_MAX + 1) - 1
    pooled = torch.nn.functional.adaptive_max_pool2d(planes[None], (TILE_MAX, TILE_MAX))[0]
    assert values[TILE_MAX + 1][TILE_MAX + 1] is None                   # no fourth head
    assert values[TILE_MAX + 1][0] == float(pooled[2, 0, 0]) and heads[TILE_MAX + 1][0] == 2
    assert values[0][TILE_MAX] is None and heads[0][TILE_MAX] is None   # the gap


def test_visible_blanks_only_exact_zeros_after_the_query():
    plane = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert visible(plane) == [[1.0, None], [0.0, 1.0]]
    assert visible(torch.tensor([[0.5, 0.5]])) == [[0.5, 0.5]]          # one step, all keys
