"""What nnsight users do in one trace, checked against plain PyTorch hooks: invokes created
in a Python loop, a value collected layer by layer reaching another invoke at the same layer
of the same forward (in either invoke order), sweeps and traces started inside a cell."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import CellSyntaxError
from conftest import CORRUPT, PROMPT, SHORT, hook_count

LOGIT_DIFF = ii.logit_diff("Mary", "John")


def hooked_logits(model, prompts, patches=None):
    """Logits of a left-padded batch, with ``patches[layer] = fn(rows_output) -> new`` applied
    to block outputs by plain forward hooks: the oracle."""
    batch = model.prepare(list(prompts) if not isinstance(prompts, str) else [prompts])
    blocks = model.module.transformer.h
    handles = [blocks[layer].register_forward_hook(
        lambda mod, args, out, fn=fn: fn(out)) for layer, fn in (patches or {}).items()]
    try:
        with torch.no_grad():
            return model.module(**batch.kwargs).logits
    finally:
        for handle in handles:
            handle.remove()


def test_invokes_created_in_a_loop_match_one_batched_forward(demo):
    prompts = [PROMPT, CORRUPT, SHORT]
    ns = {"model": demo, "prompts": prompts}
    ii.trace(demo, "outs = []\n"
                   "for p in prompts:\n"
                   "    with tracer.invoke(p):\n"
                   "        outs.append(model.lm_head.output)\n", namespace=ns)
    expected = hooked_logits(demo, prompts)
    pos = ii.positions(demo, prompts)  # each invoke sees its own prompt's positions
    assert len(ns["outs"]) == 3
    for row, out in enumerate(ns["outs"]):
        assert torch.equal(out, pos.unpad(expected, row)[None])
    assert ns["p"] == SHORT  # the loop variable ends as Python leaves it
    assert hook_count(demo.module) == 0


def test_a_loop_invoke_reading_a_name_only_another_item_binds_is_a_clear_error(demo):
    """Each item of a loop of invokes is an invoke with its own names: item 1 cannot read
    the `clean` item 0 binds (nnsight would hand it over; here it names the rule and the fix)."""
    ns = {"model": demo, "pair": [PROMPT, CORRUPT]}
    with pytest.raises(ii.InterventionError, match="`clean` is read before this invoke") as info:
        ii.trace(demo, "for i, p in enumerate(pair):\n"
                       "    with tracer.invoke(p):\n"
                       "        if i == 0:\n"
                       "            clean = model.transformer.h[1].output\n"
                       "        else:\n"
                       "            model.transformer.h[1].output[:, 10] = clean[:, 10]\n"
                       "            patched = model.lm_head.output\n", namespace=ns)
    assert info.value.line == 6 and "one invoke block of its own" in str(info.value)
    assert ns == {"model": demo, "pair": [PROMPT, CORRUPT]}
    assert hook_count(demo.module) == 0


def test_one_collector_invoke_patches_a_loop_of_invokes(demo):
    """The fix the error names: collect in one invoke, patch in the loop."""
    ns = {"model": demo, "clean": PROMPT, "corrupt": [CORRUPT, SHORT]}
    ii.trace(demo, "with tracer.invoke(clean):\n"
                   "    h = model.transformer.h[1].output\n"
                   "patched = []\n"
                   "for p in corrupt:\n"
                   "    with tracer.invoke(p):\n"
                   "        model.transformer.h[1].output[:, -1] = h[:, -1]\n"
                   "        patched.append(model.lm_head.output[:, -1])\n", namespace=ns)
    clean_h = {}
    hooked_logits(demo, PROMPT, {1: lambda out: clean_h.setdefault("h", out)})
    for row, text in enumerate([CORRUPT, SHORT]):
        def patch(out):
            out = out.clone()
            out[:, -1] = clean_h["h"][:, -1]
            return out
        expected = hooked_logits(demo, text, {1: patch})[:, -1]
        torch.testing.assert_close(ns["patched"][row], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ns["patched"][0], hooked_logits(demo, CORRUPT)[:, -1])


@pytest.mark.parametrize("collector_first", [True, False])
def test_values_collected_layer_by_layer_reach_the_other_invoke_at_that_layer(demo,
                                                                            collector_first):
    collect = ("with tracer.invoke(clean):\n"
               "    acts = []\n"
               "    for l in range(4):\n"
               "        acts.append(model.transformer.h[l].output)\n")
    patch = ("with tracer.invoke(corrupt):\n"
             "    for l in range(4):\n"
             "        model.transformer.h[l].output[:, 10] = acts[l][:, 10]\n"
             "    patched = model.lm_head.output\n")
    source = collect + patch if collector_first else patch + collect
    ns = {"model": demo, "clean": PROMPT, "corrupt": CORRUPT}
    ii.trace(demo, source, namespace=ns)
    prompts = [PROMPT, CORRUPT] if collector_first else [CORRUPT, PROMPT]
    src, dst = (0, 1) if collector_first else (1, 0)

    def patch_fn(out):
        out = out.clone()
        out[dst, 10] = out[src, 10]
        return out

    expected = hooked_logits(demo, prompts, {l: patch_fn for l in range(4)})[dst:dst + 1]
    torch.testing.assert_close(ns["patched"], expected, rtol=0, atol=1e-5)


def test_a_sweep_inside_a_trace_cell_equals_the_same_sweep_outside(demo):
    ns = {"model": demo, "ii": ii, "clean": PROMPT, "corrupt": CORRUPT}
    ii.trace(demo, "h = model.transformer.h[1].output\n"
                   "inside = ii.patch_sweep(model, clean, corrupt, ii.logit_diff('Mary', 'John'))\n"
                   "logits = model.lm_head.output\n", PROMPT, namespace=ns)
    outside = ii.patch_sweep(demo, PROMPT, CORRUPT, LOGIT_DIFF)
    assert torch.equal(ns["inside"].values, outside.values)
    assert torch.equal(ns["logits"], hooked_logits(demo, PROMPT))
    assert hook_count(demo.module) == 0


def test_a_trace_inside_a_trace_cell_runs_on_its_own(demo):
    ns = {"model": demo, "ii": ii, "corrupt": CORRUPT}
    ii.trace(demo, "model.transformer.h[0].output[:] = 0\n"
                   "inner = ii.trace(model, 'l = model.lm_head.output', corrupt,\n"
                   "                 namespace={'model': model}).names['l']\n"
                   "outer = model.lm_head.output\n", PROMPT, namespace=ns)
    assert torch.equal(ns["inner"], hooked_logits(demo, CORRUPT))   # the outer edit is not in it
    zero = {0: lambda out: torch.zeros_like(out)}
    assert torch.equal(ns["outer"], hooked_logits(demo, PROMPT, zero))


def test_a_module_called_ad_hoc_inside_a_cell_does_not_fire_the_trace(demo):
    ns = {"model": demo}
    ii.trace(demo, "h = model.transformer.h[3].output\n"
                   "again = model.transformer.h[3](h)\n"
                   "logits = model.lm_head.output\n", PROMPT, namespace=ns)
    assert torch.equal(ns["logits"], hooked_logits(demo, PROMPT))


def test_tracer_is_reserved_in_a_cell(demo):
    with pytest.raises(CellSyntaxError, match="`tracer` is the running trace"):
        ii.trace(demo, "tracer = 1", PROMPT, namespace={"model": demo})


def test_statements_in_an_invoke_loop_run_before_the_forward_once_per_item(demo):
    ns = {"model": demo, "prompts": [PROMPT, SHORT]}
    ii.trace(demo, "scales = []\n"
                   "for k, p in enumerate(prompts):\n"
                   "    scale = 2.0 * (k + 1)\n"
                   "    scales.append(scale)\n"
                   "    with tracer.invoke(p):\n"
                   "        model.transformer.h[0].output = model.transformer.h[0].output * scale\n"
                   "        logits = model.lm_head.output\n", namespace=ns)
    assert ns["scales"] == [2.0, 4.0] and ns["scale"] == 4.0
    expected = hooked_logits(demo, SHORT, {0: lambda out: out * 4.0})
    torch.testing.assert_close(ns["logits"][:, -expected.shape[1]:], expected, rtol=1e-4,
                               atol=1e-4)
