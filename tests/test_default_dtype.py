"""Every analysis under another default dtype (``torch.set_default_dtype(torch.float64)``) on
a float32 model: it runs in the model's dtype and gives the numbers it gives under float32,
bit for bit (the default dtype is the notebook's business, not the model's)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.sweep import memo
from conftest import CORRUPT, PROMPT

METRIC = ii.logit_diff("Mary", "John")
SWEEPS = {
    "resid_pre": dict(site="resid_pre"),
    "head_out": dict(site="head_out"),
    "mlp_out-attribution": dict(site="mlp_out", method="attribution"),
    "head_out-atp*": dict(site="head_out", method="atp*"),
    "head_q-activation": dict(site="head_q", layers=[2, 3]),
    "path": dict(method="path", receivers=[(3, 0)]),
}


@contextmanager
def default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def both(fn):
    """``fn()`` under float32 and under float64 as the default dtype, nothing kept between."""
    memo.forget()
    a = fn()
    memo.forget()
    with default_dtype(torch.float64):
        b = fn()
    memo.forget()
    return a, b


@pytest.mark.parametrize("options", SWEEPS.values(), ids=SWEEPS.keys())
def test_sweep_under_float64_default_equals_float32_default(demo, options):
    a, b = both(lambda: ii.patch_sweep(demo, [PROMPT, PROMPT.replace("store", "park")],
                                       [CORRUPT, CORRUPT.replace("store", "park")], METRIC,
                                       **options))
    assert b.values.dtype == torch.float32
    assert torch.equal(a.raw, b.raw) and torch.equal(a.values, b.values)


def test_causal_tracing_under_float64_default(demo):
    a, b = both(lambda: ii.patch_sweep(demo, PROMPT, metric=ii.prob("Mary"), method="noise",
                                       subject="Mary and John", samples=2, seed=1))
    assert torch.equal(a.raw, b.raw)


def test_trace_cache_and_decompose_under_float64_default(demo):
    def run():
        ns = {"model": demo}
        ii.trace(demo, "h = model.transformer.h[2].output\nlogits = model.lm_head.output",
                 PROMPT, namespace=ns)
        cache = ii.cache(demo, [PROMPT, "When Mary and John went"], sites=["resid_post"])
        parts = ii.decompose(demo, PROMPT, METRIC)
        return ns["h"], ns["logits"], cache["resid_post", 2][1], parts
    a, b = both(run)
    for x, y in zip(a[:3], b[:3]):
        assert y.dtype == torch.float32 and torch.equal(x, y)
    assert repr(a[3]) == repr(b[3])
