"""Metrics that cannot give what is asked are errors, not invented numbers: a metric that
returns one number for the batch has no per-prompt values; attribution needs a metric with a
gradient."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from conftest import CORRUPT, PROMPT

CLEAN2, CORRUPT2 = [PROMPT, PROMPT.replace("store", "park")], [CORRUPT, CORRUPT.replace("store", "park")]


def test_a_batch_mean_metric_keeps_values_but_has_no_per_prompt(demo):
    a, b = demo.token_id("Mary"), demo.token_id("John")
    mean = ii.patch_sweep(demo, CLEAN2, CORRUPT2, lambda l: (l[:, -1, a] - l[:, -1, b]).mean())
    each = ii.patch_sweep(demo, CLEAN2, CORRUPT2, lambda l: l[:, -1, a] - l[:, -1, b])
    torch.testing.assert_close(mean.raw, each.raw, rtol=0, atol=1e-5)
    torch.testing.assert_close(mean.values, each.values, rtol=0, atol=1e-5)
    assert each.per_prompt.shape == (*each.raw.shape, 2)
    assert not torch.equal(each.per_prompt[..., 0], each.per_prompt[..., 1])
    with pytest.raises(InputError, match="one number for the whole batch.*drop a final"):
        mean.per_prompt


@pytest.mark.parametrize("site", ["resid_pre", "head_v"])
def test_a_batch_mean_metric_through_the_magic(shell, site):
    shell.user_ns.update(clean=CLEAN2, corrupt=CORRUPT2, a=shell.user_ns["model"].token_id("Mary"),
                         b=shell.user_ns["model"].token_id("John"))
    shell.run_cell("r = %patch_sweep model --clean clean --corrupted corrupt --metric "
                   f"lambda l: (l[:, -1, a] - l[:, -1, b]).mean() --site {site} --quiet")
    with pytest.raises(InputError, match="per-prompt values do not exist"):
        shell.user_ns["r"].per_prompt


@pytest.mark.parametrize("metric", ["lambda l: float((l[:, -1, a] - l[:, -1, b]).sum())",
                                    "lambda l: (l[:, -1, a] - l[:, -1, b]).detach()"])
def test_an_attribution_metric_without_a_gradient_says_return_a_tensor(shell, metric):
    shell.user_ns.update(clean=PROMPT, corrupt=CORRUPT, a=shell.user_ns["model"].token_id("Mary"),
                         b=shell.user_ns["model"].token_id("John"), _sweep=None)
    with pytest.raises(InputError, match="differentiates the metric.*Return a tensor"):
        shell.run_cell(f"%patch_sweep model --clean clean --corrupted corrupt --metric {metric} "
                       "--method attribution --quiet")
    assert shell.user_ns["_sweep"] is None and torch.is_grad_enabled()
