"""A plain callable metric runs at the speed of a built-in one: sweeps find the logit positions
it reads from the clean run (gradient, checked by poisoning the other positions) and compute
logits only there. A metric that reads other positions -- several, all of them, one chosen by
the data, one without a gradient -- still gets them: every result equals the naive loop
(plain hooks, full logits) or the sweep that gives the metric every position."""

from __future__ import annotations

import math

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from ipy_intervene.analysis.metrics import as_metric
from ipy_intervene.analysis.reads import find_reads
from conftest import CLEAN2, CORRUPT, CORRUPT2, PROMPT, mary_john
from sweep_oracle import naive_activation




def metrics(model):
    """name -> (metric, what detection must find: (positions, spread) or None for all)."""
    a, b = mary_john(model)
    return {
        "last": (lambda l: l[:, -1, a] - l[:, -1, b], ((14,), False)),
        "last by its index": (lambda l: l[:, 14, a] - l[:, 14, b], ((14,), True)),
        "several": (lambda l: l[:, 3, a] - l[:, -1, b] + l[:, 9].logsumexp(-1),
                    ((3, 9, 14), True)),
        "mean over positions": (lambda l: l[:, :, a].mean(1), None),
        "argmax of another position": (
            lambda l: l[torch.arange(l.shape[0]), l[:, 12].argmax(-1) % l.shape[1], a], None),
        "no gradient": (lambda l: (l[:, -1].argmax(-1) == a).float() + l[:, -1, b].detach(),
                        None),
        "branch on another position": (
            lambda l: torch.where(l[:, 5, a] > l[:, 5, b], l[:, -1, a], l[:, -1, b]), None),
    }


NAMES = ["last", "last by its index", "several", "mean over positions",
         "argmax of another position", "no gradient", "branch on another position"]


def clean_logits(model, prompts=CLEAN2):
    with torch.no_grad():
        return model.module(**model.prepare([prompts]).kwargs).logits


@pytest.mark.parametrize("name", NAMES)
def test_detection_finds_what_the_metric_reads(demo, name):
    fn, expected = metrics(demo)[name]
    metric = as_metric(fn)
    reads = find_reads(metric, metric.bind(demo, 2), clean_logits(demo))
    if expected is None:
        assert reads.every and reads.how.startswith("all")
    else:
        assert (reads.positions, reads.spread) == expected and reads.how == "found"


@pytest.mark.parametrize("name", NAMES)
def test_activation_sweep_with_any_metric_equals_the_naive_loop(arch_model, name):
    arch, model = arch_model
    fn = metrics(model)[name][0]
    got = ii.patch_sweep(model, CLEAN2, CORRUPT2, fn, site="resid_pre")
    a, b = model.prepare([CLEAN2]).kwargs, model.prepare([CORRUPT2]).kwargs
    expected = naive_activation(model.module, arch, "resid_pre", b, a, fn,
                                model.config.num_hidden_layers, 4)
    torch.testing.assert_close(got.per_prompt.reshape(expected.shape), expected, atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("name", ["last", "several", "argmax of another position"])
@pytest.mark.parametrize("method, site, kw", [
    ("activation", "head_out_pos", {"direction": "noising"}),
    ("activation", "mlp_out", {"batch_size": 3}),
    ("noise", "resid_pre", {"subject": "Mary", "samples": 2}),
    ("attribution", "resid_pre", {}),
    ("activation", "head_v", {}),
    ("activation", "head_pattern_pos", {"direction": "noising"}),
    ("path", "resid_pre", {}),
    ("path", "resid_pre", {"receivers": [(2, 1)], "receiver_input": "v"}),
])
def test_every_method_equals_the_sweep_that_gives_every_position(demo, name, method, site, kw):
    fn, expected = metrics(demo)[name]
    got = ii.patch_sweep(demo, CLEAN2, CORRUPT2, fn, method=method, site=site, **kw)
    want = ii.patch_sweep(demo, CLEAN2, CORRUPT2, ii.metric(fn, positions="all"),
                          method=method, site=site, **kw)
    torch.testing.assert_close(got.per_prompt, want.per_prompt, atol=1e-5, rtol=0)
    assert (got.clean, got.corrupted) == pytest.approx((want.clean, want.corrupted), abs=1e-5)
    found = got.extra["metric_positions"]
    assert found.startswith("found") if expected else found.startswith("all")
    assert want.extra["metric_positions"] == "all (declared)"


def test_a_narrowed_metric_gets_the_patched_logits_at_its_positions(demo):
    """Position 9 changes under patches at positions <= 9: a metric that reads it must see
    that change, not the corrupted run's logits."""
    a, b = mary_john(demo)
    seen = []

    def fn(logits):
        seen.append(logits.shape)
        return logits[:, 9, a] - logits[:, -1, b]

    got = ii.patch_sweep(demo, PROMPT, CORRUPT, fn, positions=[4, 10], batch_size=4)
    want = ii.patch_sweep(demo, PROMPT, CORRUPT, ii.metric(fn, positions="all"),
                          positions=[4, 10])
    torch.testing.assert_close(got.raw, want.raw, atol=1e-5, rtol=0)
    assert not torch.allclose(got.raw[:, 0], got.raw[:, 1])  # position 4 reaches logits at 9
    assert got.extra["metric_positions"] == "found: [9, 14] (spread)"


def test_declared_positions_are_trusted_and_narrow(demo):
    a, b = mary_john(demo)
    shapes = []

    @ii.metric(positions=[-1])
    def last(logits):
        shapes.append(tuple(logits.shape[1:2]))
        return logits[:, -1, a] - logits[:, -1, b]

    result = ii.patch_sweep(demo, PROMPT, CORRUPT, last)
    assert set(shapes) == {(1,)} and result.extra["metric_positions"] == "declared: [14]"


def test_poisoning_catches_a_read_with_zero_gradient():
    """``relu`` of a negative logit has zero gradient but NaN gets through it."""
    logits = -torch.rand(2, 6, 5) - 1
    metric = as_metric(lambda l: l[:, -1, 0] + torch.relu(l[:, 2, 1]))
    reads = find_reads(metric, metric.bind(None, 2), logits)
    assert reads.every and "without a gradient" in reads.how


def test_poisoning_with_values_catches_a_nan_blind_read():
    """``nan_to_num`` hides NaN, so the second poison (large values) must catch the read."""
    logits = torch.rand(2, 6, 5)
    metric = as_metric(lambda l: l[:, -1, 0] + (l[:, 1].nan_to_num(0.0) > 100).any(-1).float())
    reads = find_reads(metric, metric.bind(None, 2), logits)
    assert reads.every


def test_a_metric_that_is_not_finite_on_the_clean_run_gets_every_position():
    logits = torch.rand(2, 6, 5)
    metric = as_metric(lambda l: l[:, -1, 0] * math.inf)
    assert find_reads(metric, metric.bind(None, 2), logits).every


def test_a_metric_error_on_the_clean_logits_is_the_metrics_own(demo):
    def broken(logits):
        raise ValueError("my metric is broken")

    with pytest.raises(ValueError, match="my metric is broken"):
        ii.patch_sweep(demo, PROMPT, CORRUPT, broken)


def test_unknown_positions_word_is_an_error():
    with pytest.raises(InputError, match="'all' or 'auto'"):
        ii.metric(lambda l: l[:, -1, 0], positions="last")
