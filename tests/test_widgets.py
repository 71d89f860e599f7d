"""Widget logic without a browser: sliders, clicks, the detail panel, the lens, bundles."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.widgets.lens_view import LensView
from ipy_intervene.widgets.sweep_view import SweepView
from conftest import CORRUPT, PROMPT
from sweep_oracle import patched_logits, record_site

METRIC = ii.logit_diff("Mary", "John")


@pytest.fixture(scope="module")
def sweeps(demo):
    return {site: ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, site=site)
            for site in ("resid_pre", "head_out", "head_out_pos")}


def test_sweep_view_starts_on_the_strongest_cell(sweeps):
    view = SweepView(sweeps["resid_pre"])
    assert view.index() == (1, 10)  # S2 at layer 1: the demo's IOI circuit
    heat, mark, line = view.figure.data
    assert (mark.x, mark.y) == (("John (10)",), ("L1",))
    assert list(line.x) == pytest.approx(sweeps["resid_pre"].values[:, 10].tolist())


def test_moving_a_slider_updates_the_one_figure_in_place(sweeps):
    view = SweepView(sweeps["resid_pre"])
    figure, before = view.figure, view.detail.value
    view.layer.value = 3
    view.pos.value = 14
    assert view.figure is figure
    assert figure.data[1].y == ("L3",) and figure.data[1].x == ("to (14)",)
    assert list(figure.data[2].x) == pytest.approx(sweeps["resid_pre"].values[:, 14].tolist())
    assert view.detail.value != before and "layer 3, pos 14" in view.detail.value


def test_clicking_a_cell_moves_the_sliders(sweeps):
    view = SweepView(sweeps["resid_pre"])
    view._on_click(view.figure.data[0], SimpleNamespace(point_inds=[(2, 5)]), None)
    assert (view.layer.value, view.pos.value) == (2, 5)
    heads = SweepView(sweeps["head_out"])
    heads._on_click(heads.figure.data[0], SimpleNamespace(point_inds=[(0, 3)]), None)
    assert (heads.layer.value, heads.head.value) == (0, 3) and heads.pos is None


def test_head_slider_switches_the_heatmap_plane(sweeps):
    result = sweeps["head_out_pos"]
    view = SweepView(result)
    view.head.value = 0
    z0 = torch.tensor(view.figure.data[0].z)
    view.head.value = 2
    z2 = torch.tensor(view.figure.data[0].z)
    torch.testing.assert_close(z0, result.values[:, :, 0])
    torch.testing.assert_close(z2, result.values[:, :, 2])
    assert not torch.equal(z0, z2)


def test_detail_panel_top_tokens_are_the_patched_run(demo, sweeps):
    """The top tokens shown for a cell equal a plain hooked forward with that patch."""
    view = SweepView(sweeps["resid_pre"])
    view.select(layer=2, pos=14)
    kwargs = demo.prepare([PROMPT]).kwargs
    corrupt = demo.prepare([CORRUPT]).kwargs
    with torch.no_grad():
        clean, _ = record_site(demo.module, "gpt2", "resid_pre", [2], kwargs)
        logits = patched_logits(demo.module, "gpt2", "resid_pre", [(2, 14, None, clean[2])],
                                corrupt, 4)
    probs = logits[0, -1].softmax(-1)
    expected = [demo.tokenizer.decode([int(i)]) for i in probs.topk(5).indices]
    shown = [t for t, _ in view._top_tokens((2, 14))]
    assert shown == expected
    assert f"{expected[0]!r}" in view.detail.value.replace("&#x27;", "'")


def test_sweep_view_bundle_has_widget_html_and_text(sweeps):
    bundle = sweeps["resid_pre"]._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "Plotly.newPlot" in bundle["text/html"] and "ii-sweep-detail" in bundle["text/html"]
    assert bundle["text/plain"].startswith("SweepResult(activation patching")


def test_lens_last_layer_is_the_model_output(demo):
    result = ii.lens(demo, PROMPT)
    with torch.no_grad():
        expected = demo.module(demo.to_tokens(PROMPT)).logits[0].softmax(-1)
    torch.testing.assert_close(result.probs[-1], expected, atol=1e-6, rtol=0)
    assert result.top(-1, -1, 1)[0][0] == "Mary"
    assert result.probs.shape == (4, 15, len(demo.tokenizer))


def test_lens_of_published_streams_equals_lens_of_the_prompt(demo):
    ns = {"model": demo}
    ii.trace(demo, "acts = [model.transformer.h[l].output for l in range(4)]", PROMPT,
             namespace=ns)
    from_trace = ii.lens(demo, ns["acts"], tokens=demo.to_str_tokens(PROMPT))
    torch.testing.assert_close(from_trace.probs, ii.lens(demo, PROMPT).probs)


def test_lens_view_sliders_and_clicks(demo):
    view = LensView(ii.lens(demo, PROMPT))
    assert (view.layer.value, view.pos.value) == (3, 14)
    before = view.detail.value
    view.layer.value = 0
    assert view.figure.data[1].y == ("L0",) and view.detail.value != before
    view._on_click(view.figure.data[0], SimpleNamespace(point_inds=[(2, 2)]), None)  # row 0: embed
    assert (view.layer.value, view.pos.value) == (1, 2)
    assert "top 5 after layer 1, Mary (2)" in view.detail.value
    bundle = view._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "text/html" in bundle


# -- issue 14: layout, labels and panels ---------------------------------------------------

LONG = " ".join([PROMPT + " Mary ."] * 3) + " " + PROMPT            # 63 tokens
LONG_CORRUPT = " ".join([PROMPT + " Mary ."] * 3) + " " + CORRUPT
STABLE = ("xaxis.range", "yaxis.range", "xaxis.tickangle", "xaxis.domain", "xaxis2.range",
          "xaxis2.domain", "yaxis2.range", "height", "width", "margin", "xaxis.automargin",
          "yaxis.automargin")


def _layout_key(figure) -> dict:
    layout = figure.layout.to_plotly_json()
    out = {}
    for path in STABLE:
        node = layout
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[path] = node
    return out


def _updates(figure) -> list[dict]:
    sent: list[dict] = []
    figure.observe(lambda change: sent.append(change["new"]) if change["new"] else None,
                   names=["_py2js_update", "_py2js_restyle"])
    return sent


def test_head_out_pos_view_keeps_its_axes_when_the_head_changes(sweeps):
    """The empty head_out_pos view: one update over several traces sent null for the
    properties only some traces changed, and the heatmap lost its x labels in the browser."""
    result = sweeps["head_out_pos"]
    view = SweepView(result)
    sent = _updates(view.figure)
    view.head.value = 1
    view.select(layer=0, pos=0)
    tokens = tuple(result.tokens[p] for p in result.positions)
    assert view.figure.data[0].x == tokens and len(view.figure.data[0].z) == 4
    assert sent and all(len(m.get("style_traces", m.get("restyle_traces", [0]))) <= 1
                        for m in sent)


@pytest.mark.parametrize("site", ["resid_pre", "head_out", "head_out_pos"])
def test_layout_is_the_same_for_every_selected_cell(sweeps, site):
    view = SweepView(sweeps[site])
    first = _layout_key(view.figure)
    size = view.result.values.shape
    edges = [(0, 0), (0, size[1] - 1), (size[0] - 1, 0), (size[0] - 1, size[1] - 1)]
    for row, col in edges:
        view._on_click(view.figure.data[0], SimpleNamespace(point_inds=[(row, col)]), None)
        assert view.index()[:2] == (row, col)
        assert _layout_key(view.figure) == first
    assert first["xaxis.range"] == [-0.5, size[1] - 0.5]
    assert first["yaxis.range"] == [-0.5, size[0] - 0.5]
    assert first["width"] is None and view.figure.layout.autosize


def test_colour_bar_sits_right_of_the_line_plot_and_its_labels(sweeps):
    figure = SweepView(sweeps["resid_pre"]).figure
    assert figure.data[0].colorbar.x >= 1.0 and figure.data[0].colorbar.xanchor == "left"
    assert figure.layout.xaxis2.domain[1] <= 1.0 and figure.layout.margin.r >= 80
    assert figure._config["responsive"]


def test_line_plot_range_holds_both_baselines(demo):
    result = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, method="attribution")
    view = SweepView(result)
    low, high = view.figure.layout.xaxis2.range
    assert low < 0 and high > 1 and view.figure.layout.xaxis2.autorange is False
    lines = [s.x0 for s in view.figure.layout.shapes if s.type == "line"]
    assert lines == [0.0, 1.0]


def test_attribution_panel_says_estimate_and_exact_patched_run(demo):
    result = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, method="attribution")
    panel = SweepView(result).detail.value
    assert "under the patch" not in panel
    assert "linear estimate" in panel and "exact patched run" in panel
    title = SweepView(result).figure.layout.title.text
    assert "linear estimate" in title


def test_title_and_panel_round_the_baselines_alike(sweeps):
    result = sweeps["resid_pre"]
    view = SweepView(result)
    for value in (result.clean, result.corrupted):
        assert f"{value:.4f}" in view.figure.layout.title.text
        assert f"{value:.4f}" in view.detail.value
    assert f"{result.clean:.4f}" in result.figure().layout.title.text


def test_causal_tracing_marks_the_subject_and_the_window(demo):
    result = ii.patch_sweep(demo, PROMPT, method="noise", subject="Mary", window=3)
    mask = torch.zeros(15, dtype=torch.bool)
    mask[2] = True  # the first "Mary"
    view = SweepView(result)
    assert view.subject == mask.nonzero().flatten().tolist()
    marked = [t for t in view.figure.layout.xaxis.ticktext if "color" in t]
    assert len(marked) == 1 and "Mary (2)" in marked[0]
    assert "subject (noised)" in view.detail.value and "window 3 layers" in \
        view.figure.layout.title.text
    view.select(layer=1, pos=2)
    window = view.figure.layout.shapes[0]
    assert (window.y0, window.y1) == (-0.5, 2.5)  # layers 0, 1, 2 restored together
    view.select(layer=3, pos=2)
    window = view.figure.layout.shapes[0]
    assert (window.y0, window.y1) == (1.5, 3.5)  # clipped at the last layer


def test_long_prompt_labels_the_selected_token_and_the_sliders_show_tokens(demo):
    result = ii.patch_sweep(demo, LONG, LONG_CORRUPT, METRIC, layers=[0, 3])
    assert len(result.positions) >= 60
    view = SweepView(result)
    for pos in (0, 31, 61, len(result.positions) - 1):
        view.select(layer=1, pos=pos)
        vals = view.figure.layout.xaxis.tickvals
        text = view.figure.layout.xaxis.ticktext
        label = result.tokens[result.positions[pos]]
        assert label in vals and text[vals.index(label)].startswith("<b>")
        assert len(vals) <= 45  # readable: no more labels than fit
    assert view.pos.label == result.tokens[result.positions[-1]]
    assert view.layer.label == "L3"
    assert view.figure.data[0].x == tuple(result.tokens)  # hover shows the token


def test_lens_hides_in_cell_words_on_long_prompts_and_keeps_them_in_hover(demo):
    short_view = LensView(ii.lens(demo, PROMPT))
    assert short_view.figure.data[0].texttemplate == "%{text}"
    view = LensView(ii.lens(demo, LONG))
    heat = view.figure.data[0]
    assert heat.texttemplate == "" and "%{customdata}" in heat.hovertemplate
    assert heat.customdata[3][-1] == ii.lens(demo, LONG).top(3, -1, 1)[0][0].strip()
    assert view.pos.label == view.result.tokens[-1]


def test_lens_of_streams_without_tokens_says_pos_not_a_fake_token(demo):
    streams = [torch.randn(1, 15, demo.module.config.n_embd) for _ in range(2)]
    labels = ii.lens(demo, streams).tokens
    assert labels == [f"pos {i}" for i in range(15)]
    given = ii.lens(demo, streams, tokens=PROMPT).tokens
    assert given[2] == "Mary (2)"


def test_lens_labels_streams_with_the_tokens_of_their_trace(demo):
    from ipy_intervene.model.provenance import remember

    streams = [torch.randn(1, 15, demo.module.config.n_embd) for _ in range(2)]
    remember({"acts": streams}, demo.to_tokens(PROMPT))
    assert ii.lens(demo, streams).tokens == ii.lens(demo, PROMPT).tokens
    other = [torch.randn(1, 15, demo.module.config.n_embd), streams[1]]
    assert ii.lens(demo, other).tokens[0] == "pos 0"  # not all from one trace: no guess


def test_lens_of_a_trace_published_stream_is_labelled_with_its_tokens(demo):
    ns = {"model": demo}
    ii.trace(demo, "acts = [model.transformer.h[l].output for l in range(4)]", PROMPT,
             namespace=ns)
    assert ii.lens(demo, ns["acts"]).tokens == ii.lens(demo, PROMPT).tokens


def test_view_bundles_show_the_selected_cell(sweeps, demo):
    view = SweepView(sweeps["resid_pre"])
    view.select(layer=3, pos=0)
    static = view.static_figure()
    assert static.layout.shapes[0].x0 == -0.5 and static.layout.shapes[0].y0 == 2.5
    assert static.layout.width is None
    lens_view = LensView(ii.lens(demo, PROMPT))
    assert lens_view.static_figure().layout.shapes[0].x0 == 13.5
