"""Screen-then-verify (ipy_intervene/sweep/screen.py): the verified values are exact
patching's, the screened cells are the approximation's top cells, ``caught`` counts them."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from ipy_intervene.sweep.screen import screen_and_verify

from conftest import CORRUPT, PROMPT

METRIC = ii.logit_diff("John", "Mary")


def _key(cell, dims):
    return tuple(cell[{"pos": "pos", "layer": "layer", "head": "head"}[d]] for d in dims)


@pytest.mark.parametrize("site,method", [("head_out", "atp*"), ("head_out_pos", "attribution"),
                                         ("mlp_out", "atp*"), ("head_k_pos", "atp*")])
def test_verified_values_are_patch_sweeps_cells(demo, site, method):
    s = screen_and_verify(demo, PROMPT, CORRUPT, METRIC, site=site, top=4, method=method)
    full = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, site=site, method="activation")
    assert len(s.cells) == 4
    for cell in s.cells:
        assert cell["exact"] == pytest.approx(float(full.values[cell["index"]]), abs=1e-5)
        assert cell["screen"] == float(s.screen.values[cell["index"]])
    verified = ~s.exact_values.isnan()
    assert int(verified.sum()) == 4
    assert torch.allclose(s.exact_values[verified], full.values[verified], atol=1e-5)


def test_the_verified_cells_are_the_screens_top_cells(demo):
    s = screen_and_verify(demo, PROMPT, CORRUPT, METRIC, site="head_out_pos", top=5)
    expected = [_key(c, s.screen.dims) for c in s.screen.top(5)]
    assert [_key(c, s.screen.dims) for c in s.cells] == expected


def test_caught_counts_the_exact_top_cells_the_screen_found(demo):
    s = screen_and_verify(demo, PROMPT, CORRUPT, METRIC, site="head_out", top=3, check=True,
                          grad_drop=False)
    full = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, site="head_out", method="activation")
    assert torch.allclose(s.exact.values, full.values)
    truth = {_key(c, full.dims) for c in full.top(3)}
    screened = {_key(c, s.screen.dims) for c in s.cells}
    assert s.caught == len(truth & screened)
    assert len(s.exact_top) == 3 and len(set(s.exact_top)) == 3


def test_without_check_nothing_is_claimed_about_the_true_top(demo):
    s = screen_and_verify(demo, PROMPT, CORRUPT, METRIC, site="mlp_out", top=2)
    assert s.caught is None and s.exact is None and s.exact_top is None


def test_the_view_shows_both_the_screen_and_the_exact_values(demo, monkeypatch):
    monkeypatch.setenv("IPY_INTERVENE_PLOTLYJS", "none")
    s = screen_and_verify(demo, PROMPT, CORRUPT, METRIC, site="head_out", top=2, check=True)
    bundle = s._repr_mimebundle_()
    assert "verified exactly" in bundle["text/plain"]
    html = bundle["text/html"]
    assert "<table>" in html and f"{s.cells[0]['exact']:.3f}" in html
    assert "caught" in html
    assert any(trace.name == "verified" for trace in s.figure().data)


def test_an_unknown_method_or_top_is_an_error(demo):
    with pytest.raises(InputError, match="method="):
        screen_and_verify(demo, PROMPT, CORRUPT, METRIC, site="head_out", method="exact")
    with pytest.raises(InputError, match="top="):
        screen_and_verify(demo, PROMPT, CORRUPT, METRIC, site="head_out", top=0)
