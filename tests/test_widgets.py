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
    view._on_click(view.figure.data[0], SimpleNamespace(point_inds=[(1, 2)]), None)
    assert (view.layer.value, view.pos.value) == (1, 2)
    assert "top 5 after layer 1, Mary (2)" in view.detail.value
    bundle = view._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "text/html" in bundle
