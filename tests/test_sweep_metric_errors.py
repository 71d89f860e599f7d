"""Asking a sweep for what it cannot give is an error, not an invented number: a metric that
returns one number for the batch has no per-prompt values; attribution needs a metric with a
gradient; ``site`` names sites, all checked before the first of several sweeps runs."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError, SiteError
from ipy_intervene.widgets.sweep_view import SweepView
from conftest import CLEAN2, CORRUPT, CORRUPT2, PROMPT, hook_count, mary_john, tiny_model




def mean_and_each(model):
    """The logit difference as one number for the batch, and as one number per prompt."""
    a, b = mary_john(model)
    return (lambda l: (l[:, -1, a] - l[:, -1, b]).mean()), (lambda l: l[:, -1, a] - l[:, -1, b])


@pytest.fixture
def magic(shell):
    a, b = mary_john(shell.user_ns["model"])
    shell.user_ns.update(clean=CLEAN2, corrupt=CORRUPT2, a=a, b=b, _sweep=None)
    return shell


# -- a metric that returns one number for the whole batch --------------------------------


@pytest.mark.parametrize("method, site", [("activation", "resid_pre"), ("activation", "head_v"),
                                          ("attribution", "mlp_out"), ("path", "resid_pre")])
def test_a_batch_mean_metric_keeps_values_but_has_no_per_prompt(demo, method, site):
    mean, each = mean_and_each(demo)
    got = ii.patch_sweep(demo, CLEAN2, CORRUPT2, mean, method=method, site=site)
    want = ii.patch_sweep(demo, CLEAN2, CORRUPT2, each, method=method, site=site)
    torch.testing.assert_close(got.raw, want.raw, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.values, want.values, rtol=0, atol=1e-5)
    assert want.per_prompt.shape == (*want.raw.shape, 2)
    assert not torch.equal(want.per_prompt[..., 0], want.per_prompt[..., 1])
    with pytest.raises(InputError, match="one number for the whole batch of prompts, so "
                                         "per-prompt values do not exist.*drop a final"):
        got.per_prompt


def test_a_batch_mean_over_one_prompt_is_that_prompt_even_after_a_batch_of_two(demo):
    mean, each = mean_and_each(demo)
    metric = ii.metric(mean)
    two = ii.patch_sweep(demo, CLEAN2, CORRUPT2, metric)
    one = ii.patch_sweep(demo, PROMPT, CORRUPT, metric)
    with pytest.raises(InputError, match="per-prompt values do not exist"):
        two.per_prompt
    expected = ii.patch_sweep(demo, PROMPT, CORRUPT, each).per_prompt
    torch.testing.assert_close(one.per_prompt, expected, rtol=0, atol=0)


def test_the_sweep_view_shows_a_batch_mean_result(demo):
    mean, _ = mean_and_each(demo)
    result = ii.patch_sweep(demo, CLEAN2, CORRUPT2, mean, site="head_out_pos")
    view = SweepView(result)
    view.select(1, 10, 0)
    assert view.index() == (1, 10, 0)
    assert f"{float(result.raw[1, 10, 0]):.4f}" in view._detail_html()
    assert "text/plain" in view._repr_mimebundle_()
    assert "largest" in repr(result)


@pytest.mark.parametrize("site", ["resid_pre", "head_v"])
def test_a_batch_mean_metric_through_the_magic(magic, site):
    magic.run_cell("r = %patch_sweep model --clean clean --corrupted corrupt --metric "
                   f"lambda l: (l[:, -1, a] - l[:, -1, b]).mean() --site {site} --quiet")
    assert magic.user_ns["r"].raw.shape[0] == 4
    with pytest.raises(InputError, match="per-prompt values do not exist"):
        magic.user_ns["r"].per_prompt


# -- attribution differentiates the metric -----------------------------------------------


@pytest.mark.parametrize("metric", [
    lambda l, a, b: float((l[:, -1, a] - l[:, -1, b]).sum()),
    lambda l, a, b: [x.item() for x in l[:, -1, a] - l[:, -1, b]],
    lambda l, a, b: (l[:, -1, a] - l[:, -1, b]).detach(),
    lambda l, a, b: torch.no_grad()(lambda: l[:, -1, a] - l[:, -1, b])(),
], ids=["float", "item", "detach", "no_grad"])
def test_an_attribution_metric_without_a_gradient_says_return_a_tensor(demo, metric):
    a, b = mary_john(demo)
    with pytest.raises(InputError, match="method='attribution' differentiates the metric.*"
                                         r"\.item\(\).*Return a tensor computed from the logits"):
        ii.patch_sweep(demo, CLEAN2, CORRUPT2, lambda l: metric(l, a, b), method="attribution")
    assert torch.is_grad_enabled() and hook_count(demo.module) == 0
    assert all(p.grad is None for p in demo.module.parameters())


@pytest.mark.parametrize("metric", ["lambda l: float((l[:, -1, a] - l[:, -1, b]).sum())",
                                    "lambda l: (l[:, -1, a] - l[:, -1, b]).detach()"])
def test_an_attribution_metric_without_a_gradient_through_the_magic(magic, metric):
    with pytest.raises(InputError, match="differentiates the metric.*Return a tensor"):
        magic.run_cell(f"%patch_sweep model --clean clean --corrupted corrupt --metric "
                       f"{metric} --method attribution --quiet")
    assert magic.user_ns["_sweep"] is None and torch.is_grad_enabled()


# -- site names ----------------------------------------------------------------------------


def counting(model):
    """A logit-difference metric and the list its calls are counted in."""
    a, b = mary_john(model)
    calls: list[int] = []

    def metric(l):
        calls.append(1)
        return l[:, -1, a] - l[:, -1, b]
    return metric, calls


@pytest.mark.parametrize("site, error, message", [
    ([], InputError, r"site=\[\] names no site\. One site: site='resid_pre'; several, one "
                     r"result each \(a dict by site\): site=\['resid_pre', 'mlp_out'\]"),
    (["resid_pre", 3], InputError, r"3 is not a site name\. One site"),
    ([["resid_pre", "mlp_out"]], InputError, r"\['resid_pre', 'mlp_out'\] is not a site name"),
    ({"resid_pre"}, InputError, "site must be a site name or a list of names; got set"),
    (["resid_pre", "mlp_uot"], SiteError, "unknown site 'mlp_uot'; sweep sites: resid_pre, "
                                          ".*head_out_pos, head_q, .*head_pattern_pos, "
                                          "expert_out, expert_out_pos$"),
])
def test_a_bad_site_list_is_an_error_before_any_sweep_runs(demo, site, error, message):
    metric, calls = counting(demo)
    with pytest.raises(error, match=message):
        ii.patch_sweep(demo, PROMPT, CORRUPT, metric, site=site)
    assert calls == []


def test_a_site_list_stops_before_any_sweep_when_one_site_cannot_be_swept(demo):
    metric, calls = counting(demo)
    with pytest.raises(InputError, match="site 'head_pattern' is swept with method='activation'"):
        ii.patch_sweep(demo, PROMPT, CORRUPT, metric, site=["resid_pre", "head_pattern"],
                       method="attribution")
    parallel = ii.wrap(tiny_model("neox", len(demo.tokenizer)), demo.tokenizer)
    with pytest.raises(SiteError, match="resid_mid` does not exist in gpt_neox models"):
        ii.patch_sweep(parallel, PROMPT, CORRUPT, metric, site=["resid_pre", "resid_mid"])
    assert calls == []


def test_a_site_list_gives_one_result_per_site_in_order(demo):
    metric = ii.logit_diff("Mary", "John")
    results = ii.patch_sweep(demo, PROMPT, CORRUPT, metric, site=("mlp_out", "resid_pre",
                                                                  "mlp_out"))
    assert list(results) == ["mlp_out", "resid_pre"]
    alone = ii.patch_sweep(demo, PROMPT, CORRUPT, metric, site="mlp_out")
    torch.testing.assert_close(results["mlp_out"].raw, alone.raw, rtol=0, atol=0)


def test_a_bad_site_through_the_magic_runs_nothing(magic):
    metric, calls = counting(magic.user_ns["model"])
    magic.user_ns["m"] = metric
    with pytest.raises(SiteError, match="unknown site 'atn_out'; sweep sites: resid_pre"):
        magic.run_cell("%patch_sweep model --clean clean --corrupted corrupt --metric m "
                       "--site resid_pre,atn_out --quiet")
    assert calls == [] and magic.user_ns["_sweep"] is None
