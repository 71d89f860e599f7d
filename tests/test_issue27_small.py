"""Issue 27: a value from a later layer used at an earlier one. In one invoke the advice is
the model's order or two cells; across invokes it is two cells (or ii.cache, then a trace),
never "two invokes": all invokes of a cell share one forward, which runs layer 1 before
layer 3. Both the check before the run (straight-line code of one invoke) and the one at
run time (loops, helpers, other invokes) name both lines, publish nothing and leave no hook.
"""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import SiteError
from ipy_intervene.tracing.trace import NO_INPUT
from conftest import PROMPT, SHORT, hook_count, hooks

TWO_INVOKES = "two invokes"
CELLS = ("two cells", "second trace", "ii.cache(...)")
ORDER = "in the order the model runs them"
ONE_FORWARD = "share one forward"

CROSS = {
    "straight-line": """
with tracer.invoke(a):
    h3 = model.transformer.h[3].output
with tracer.invoke(b):
    model.transformer.h[1].output[:, -1] = h3[:, -1]
""",
    "loop": """
with tracer.invoke(a):
    h3 = model.transformer.h[3].output
with tracer.invoke(b):
    for layer in [1]:
        model.transformer.h[layer].output[:, -1] = h3[:, -1]
""",
    "helper": """
def steer(layer, value):
    model.transformer.h[layer].output[:, -1] = value

with tracer.invoke(a):
    h3 = model.transformer.h[3].output
with tracer.invoke(b):
    steer(1, h3[:, -1])
""",
}
CROSS_LINES = {"straight-line": (5, 3), "loop": (6, 3), "helper": (3, 6)}  # (error, binding)

SAME = {   # (source, INPUT, error line, the other line, caught before the forward)
    "straight-line": ("""
with tracer.invoke(a):
    h3 = model.transformer.h[3].output
    model.transformer.h[1].output[:, -1] = h3[:, -1]
""", NO_INPUT, 4, 3, True),
    "no-invoke": ("""
h3 = model.transformer.h[3].output
model.transformer.h[1].output[:, -1] = h3[:, -1]
""", PROMPT, 3, 2, True),
    "loop": ("""
with tracer.invoke(a):
    h3 = model.transformer.h[3].output
    for layer in [1]:
        model.transformer.h[layer].output[:, -1] = h3[:, -1]
""", NO_INPUT, 5, 3, False),
}


def _fail(model, source, input_=NO_INPUT):
    """Run ``source``; return the error, whether the model's forward ran, and the namespace."""
    ns = {"model": model, "a": PROMPT, "b": SHORT}
    before = dict(ns)
    hooks_before = hook_count(model.module)
    calls = []
    with hooks((model.module.transformer.wte, lambda *_: calls.append(1))):  # embeds first
        with pytest.raises(SiteError) as info:
            ii.trace(model, source, input_, namespace=ns)
    assert ns == before                                      # nothing published
    assert hook_count(model.module) == hooks_before          # no hook left
    return info.value, bool(calls)


@pytest.mark.parametrize("case", list(CROSS))
def test_a_later_layer_into_an_earlier_one_of_another_invoke_says_one_forward(demo, case):
    error, ran = _fail(demo, CROSS[case])
    text = str(error)
    line, bound = CROSS_LINES[case]
    assert ran                                               # caught at run time
    assert error.line == line and text.startswith(f"line {line}:")
    assert f"(line {bound})" in text and "waiting for `h3`" in text
    assert "transformer.h[1].output" in text and "cannot go back" in text
    assert ONE_FORWARD in text and "another invoke" in text
    assert all(word in text for word in CELLS)
    assert TWO_INVOKES not in text and ORDER not in text


@pytest.mark.parametrize("case", list(SAME))
def test_a_later_layer_into_an_earlier_one_of_the_same_invoke_says_order_or_two_cells(
        demo, case):
    source, input_, line, other, before_run = SAME[case]
    error, ran = _fail(demo, source, input_)
    text = str(error)
    assert ran is not before_run                             # validate, or the run
    assert error.line == line and text.startswith(f"line {line}:")
    assert f"(line {other})" in text and "transformer.h[3].output" in text
    assert "transformer.h[1].output" in text and "cannot go back" in text
    assert ORDER in text and all(word in text for word in CELLS)
    assert TWO_INVOKES not in text and ONE_FORWARD not in text


def _steered_by_hand(model, source_text, target_text):
    """Plain PyTorch: block 3's output at the last token of ``source_text``, written into
    block 1's output at the last token of ``target_text``; the target's logits."""
    blocks = model.module.transformer.h
    kept = {}

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def keep(_, __, out):
        kept["h3"] = first(out)[:, -1].clone()

    def write(_, __, out):
        first(out)[:, -1] = kept["h3"]

    with torch.no_grad():
        with hooks((blocks[3], keep)):
            model.module(input_ids=model.to_tokens(source_text))
        with hooks((blocks[1], write)):
            return model.module(input_ids=model.to_tokens(target_text)).logits


def test_the_advice_works_two_cells_or_a_cache_then_a_trace(demo):
    ns = {"model": demo}
    ii.trace(demo, "h3 = model.transformer.h[3].output", PROMPT, namespace=ns)
    second = ("model.transformer.h[1].output[:, -1] = h3[:, -1]\n"
              "logits = model.lm_head.output")
    ii.trace(demo, second, SHORT, namespace=ns)
    expected = _steered_by_hand(demo, PROMPT, SHORT)
    torch.testing.assert_close(ns["logits"], expected, rtol=0, atol=1e-5)
    cached = ii.cache(demo, PROMPT, sites="resid_post", layers=3)
    last = cached["resid_post", 3][0][-1]
    torch.testing.assert_close(last, ns["h3"][0, -1], rtol=0, atol=1e-5)
    ns2 = {"model": demo, "v": last}
    ii.trace(demo, "model.transformer.h[1].output[:, -1] = v\nlogits = model.lm_head.output",
             SHORT, namespace=ns2)
    torch.testing.assert_close(ns2["logits"], expected, rtol=0, atol=1e-5)
    assert hook_count(demo.module) == 0
