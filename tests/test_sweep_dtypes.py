"""bfloat16 and float16 models: every method x site x metric kind runs to the end and equals
the naive plain-hooks loop run in the same dtype. Batching changes the order of float
operations, so the tolerance is a few units of the dtype's precision at the metric's scale
(4 eps x (1 + |metric|); most cells are in fact bit-identical); each case checks that its
effects span more than twice that, so the comparison can fail. Results are float32."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from conftest import ARCHS, CORRUPT, PROMPT, tiny_model
from sweep_oracle import hand_attribution, naive_activation, naive_causal_trace

DTYPES = (torch.bfloat16, torch.float16)
CASES = [("activation", "resid_pre"), ("activation", "attn_out"), ("activation", "head_out"),
         ("noise", "resid_post"), ("attribution", "resid_pre"), ("attribution", "mlp_out")]


@pytest.fixture(scope="module", params=[(a, d) for a in ARCHS for d in DTYPES],
                ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}")
def low(request, demo):
    """A tiny model at 32x the usual weight scale (effects well above bf16's precision)."""
    arch, dtype = request.param
    module = tiny_model(arch, len(demo.tokenizer))
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() == 2:
                param.mul_(32)
    return arch, ii.wrap(module.to(dtype), demo.tokenizer)


def metrics(model):
    """(metric given to the sweep, the same written for the naive loop, is it a batch mean)."""
    g, b = model.token_id("Mary"), model.token_id("John")
    plain = lambda l: l[:, -1, g] - l[:, -1, b]  # noqa: E731 - as users write it
    return [(ii.logit_diff("Mary", "John"), lambda l: l[:, -1, g].float() - l[:, -1, b].float()),
            (plain, plain),
            (lambda l: plain(l).mean(), lambda l: plain(l).float())]


def naive(arch, model, method, site, oracle):
    a, b = model.prepare([PROMPT]).kwargs, model.prepare([CORRUPT]).kwargs
    if method == "activation":
        return naive_activation(model.module, arch, site, b, a, oracle, 3, 4)
    if method == "attribution":
        return hand_attribution(model.module, arch, site, b, a, oracle, 3, 4)
    return naive_causal_trace(model.module, arch, site, a, [2, 3, 4], oracle, 3, samples=2,
                              seed=0, window=1)


@pytest.mark.parametrize("method, site", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_low_precision_sweeps_equal_the_naive_loop_in_the_same_dtype(low, method, site):
    arch, model = low
    eps = torch.finfo(next(model.module.parameters()).dtype).eps
    for metric, oracle in metrics(model):
        kw = dict(subject="Mary and John", samples=2, seed=0) if method == "noise" else {}
        result = ii.patch_sweep(model, PROMPT, None if method == "noise" else CORRUPT, metric,
                                method=method, site=site, **kw)
        expected = naive(arch, model, method, site, oracle).float().reshape(result.raw.shape)
        assert result.raw.dtype == torch.float32
        tol = 4 * eps * (1 + float(expected.abs().max()))
        torch.testing.assert_close(result.raw, expected, rtol=0, atol=tol)
        assert float(expected.max() - expected.min()) > 2 * tol  # the check can fail
