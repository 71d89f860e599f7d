"""Bad input gets a clear error naming the cell line, and loses nothing.

After any failure: no name was published or changed, no hook is left on any module, the
weights are unchanged, and the next trace gives the same result as before.
"""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import (CellSyntaxError, InputError, InterventionError, SiteError,
                                  ValueMismatchError)
from conftest import PROMPT, checksum, hook_count

GOOD = "logits = model.lm_head.output"

CASES = [
    # (id, source, input, expected error type, expected line, words the message must contain)
    ("syntax", "h = model.transformer.h[0].output\nx = (1 +\n", PROMPT, CellSyntaxError, 2,
     ["never closed"]),
    ("unknown-path", "h = model.transformer.hh[0].output", PROMPT, SiteError, 1,
     ["hh", "Did you mean `h`"]),
    ("index-past-end", "x = 1\nh = model.transformer.h[9].output", PROMPT, SiteError, 2,
     ["9", "has 4 layers"]),
    ("out-of-order", "a = model.transformer.h[3].output\nb = model.transformer.h[1].output",
     PROMPT, SiteError, 2, ["line 1", "cannot go back"]),
    ("write-after-later-site-in-loop",
     "a = model.transformer.h[3].output\nfor l in range(2):\n    model.transformer.h[l].output[:] = 0",
     PROMPT, SiteError, 3, ["already run", "cannot go back"]),
    ("never-reached-after-stop", "h = model.transformer.h[0].output\ntracer.stop()\n"
     "x = model.transformer.h[2].output", PROMPT, SiteError, 3, ["never reached", "stop"]),
    ("wrong-shape-assign", "model.transformer.h[1].output = torch.zeros(3, 5)", PROMPT,
     ValueMismatchError, 1, ["[1, 15, 128]", "[3, 5]"]),
    ("wrong-shape-edit", "model.transformer.h[1].output[:, -1] = torch.zeros(7)", PROMPT,
     ValueMismatchError, 1, ["[1, 128]", "[7]"]),
    ("user-exception", "h = model.transformer.h[1].output\nx = 1 / 0\ny = 2", PROMPT,
     ZeroDivisionError, 2, []),
    ("empty-prompt", GOOD, "", InputError, None, ["empty prompt"]),
    ("empty-prompt-in-invoke", "with tracer.invoke('   '):\n    l = model.lm_head.output",
     None, InputError, 1, ["empty prompt"]),
    ("site-outside-invoke",
     "h = model.transformer.h[0].output\nwith tracer.invoke(p):\n    l = model.lm_head.output",
     None, SiteError, 1, ["inside an invoke"]),
    ("not-a-module", "x = model.transformer.h[0].ln_1.weight.output", PROMPT, SiteError, 1,
     ["not a module"]),
]


def _run(model, source, input_, ns):
    from ipy_intervene.tracing.trace import NO_INPUT

    return ii.trace(model, source, NO_INPUT if input_ is None else input_, namespace=ns)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(demo, case):
    _, source, input_, error, line, words = case
    ns = {"model": demo, "torch": torch, "p": PROMPT, "keep": 1}
    before_ns = dict(ns)
    grad_mode = torch.is_grad_enabled()
    before_weights = checksum(demo.module)
    before_logits = _run(demo, GOOD, PROMPT, {"model": demo}).names["logits"]
    with pytest.raises(error) as info:
        _run(demo, source, input_, ns)
    text = str(info.value)
    if isinstance(info.value, InterventionError):
        assert info.value.line == line
        if line is not None:
            assert text.startswith(f"line {line}:")
    else:
        assert any(f"line {line}" in note for note in getattr(info.value, "__notes__", []))
    for word in words:
        assert word in text
    assert ns == before_ns                          # nothing published, nothing changed
    assert hook_count(demo.module) == 0             # no hook, no patched forward left
    assert checksum(demo.module) == before_weights  # weights unchanged
    assert torch.is_grad_enabled() == grad_mode     # grad mode restored
    after = _run(demo, GOOD, PROMPT, {"model": demo}).names["logits"]
    assert torch.equal(after, before_logits)        # the next trace works, same result


def test_cross_invoke_wait_that_cannot_be_met_names_the_line(demo):
    ns = {"model": demo, "a": PROMPT, "b": PROMPT}
    source = ("with tracer.invoke(a):\n    model.transformer.h[0].output = late\n"
              "with tracer.invoke(b):\n    late = model.transformer.h[2].output\n")
    with pytest.raises(InterventionError) as info:
        ii.trace(demo, source, namespace=ns)
    assert info.value.line == 2 and "cannot go back" in str(info.value)
    assert "waiting for `late`" in str(info.value) and "(line 4)" in str(info.value)
    assert "late" not in ns and hook_count(demo.module) == 0


def test_nested_invoke_is_rejected(demo):
    with pytest.raises(CellSyntaxError) as info:
        ii.trace(demo, "with tracer.invoke(p):\n    if True:\n        with tracer.invoke(p):\n"
                       "            pass\n", namespace={"p": PROMPT})
    assert info.value.line == 3


def test_input_on_line_and_invoke_blocks_conflict(demo):
    with pytest.raises(CellSyntaxError, match="use one or the other"):
        ii.trace(demo, "with tracer.invoke(p):\n    pass\n", PROMPT, namespace={"p": PROMPT})


def test_sites_outside_a_trace_explain_themselves(demo):
    with pytest.raises(InterventionError, match="only available inside a %%trace cell"):
        demo.transformer.h[0].output


def test_keyboard_interrupt_mid_forward_leaves_nothing_behind(demo):
    ns = {"model": demo}
    weights = checksum(demo.module)
    source = ("h = model.transformer.h[1].output\n"
              "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        ii.trace(demo, source, PROMPT, namespace=ns)
    assert "h" not in ns and hook_count(demo.module) == 0 and checksum(demo.module) == weights


def test_failed_grad_cell_restores_grad_mode_and_param_grads(demo):
    with torch.no_grad(), pytest.raises(ZeroDivisionError):
        ii.trace(demo, "h = model.transformer.h[0].output\nloss = model.lm_head.output.sum()\n"
                       "loss.backward()\n1 / 0", PROMPT, namespace={}, grad=True)
        assert not torch.is_grad_enabled()
    assert all(p.grad is None for p in demo.module.parameters())


def test_a_step_that_already_passed_is_named(demo):
    source = ("for s in tracer.steps():\n    x = model.lm_head.output\n"
              "for s in tracer.steps():\n    y = model.transformer.h[0].output\n")
    ns = {"model": demo}
    with pytest.raises(SiteError) as info:
        ii.trace(demo, source, PROMPT, namespace=ns, generate=2)
    assert info.value.line == 4 and "step 0" in str(info.value) and "at step 1" in str(info.value)
    assert "x" not in ns and hook_count(demo.module) == 0


def test_a_module_that_never_runs_is_named(demo):
    from conftest import tiny_model

    module = tiny_model("gpt2", len(demo.tokenizer))
    module.transformer.unused = torch.nn.Linear(4, 4)
    model = ii.wrap(module, demo.tokenizer)
    with pytest.raises(SiteError) as info:
        ii.trace(model, "a = 1\nu = model.transformer.unused.output", PROMPT, namespace={})
    assert info.value.line == 2
    assert "never reached" in str(info.value) and "never called" in str(info.value)
    assert hook_count(module) == 0


def test_a_cell_that_catches_the_never_reached_error_and_asks_again_is_stopped(demo):
    """After tracer.stop(), a loop that catches the error and asks again used to hang the
    forward's end (the killed greenlet's GreenletExit was taken for a new request)."""
    cell = ("h0 = model.transformer.h[0].output\n"
            "tracer.stop()\n"
            "for _ in range(6):\n"
            "    try:\n"
            "        x = model.transformer.h[2].output\n"
            "    except Exception:\n"
            "        pass\n")
    ns = {"model": demo}
    with pytest.raises(InterventionError, match=r"line 5: `transformer.h\[2\].output` was never "
                                                r"reached: tracer.stop\(\) \(line 2\).*asked "
                                                r"again; stopped after 3 times"):
        ii.trace(demo, cell, PROMPT, namespace=ns)
    assert "h0" not in ns and hook_count(demo.module) == 0
