"""The rule for names across invokes, case by case: each invoke's names are its own, a read
comes from the one invoke that binds the name (else an error before anything runs), other
names are the notebook's as they were when the invoke was registered; reads keep their
values when the cell later edits the same memory in place."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import CellSyntaxError
from conftest import CORRUPT, PROMPT, SHORT, checksum, hook_count

PROMPTS = [PROMPT, SHORT, "When Mary and John went to the store"]


def alone(model, text, layer=None, fn=None, pre=False):
    """Logits of ``text`` alone, with ``fn`` as a forward (or pre) hook on block ``layer``."""
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    handle = None
    if fn is not None:
        block = model.module.transformer.h[layer]
        handle = (block.register_forward_pre_hook(fn) if pre else block.register_forward_hook(fn))
    try:
        with torch.no_grad():
            return model.module(ids).logits
    finally:
        if handle is not None:
            handle.remove()


def last(x):
    return x[0, -1]


def test_two_invokes_binding_the_same_name_each_use_their_own(demo):
    ns = {"model": demo, "a": PROMPT, "b": CORRUPT}
    ii.trace(demo, "out = {}\n"
                   "with tracer.invoke(a):\n    s = 1.0\n"
                   "    model.transformer.h[2].output = model.transformer.h[2].output * s\n"
                   "    out['a'] = model.lm_head.output\n"
                   "with tracer.invoke(b):\n    s = 0.0\n"
                   "    model.transformer.h[2].output = model.transformer.h[2].output * s\n"
                   "    out['b'] = model.lm_head.output\n", namespace=ns)
    torch.testing.assert_close(last(ns["out"]["a"]), last(alone(demo, PROMPT)), rtol=1e-5, atol=1e-5)
    zeroed = alone(demo, CORRUPT, 2, lambda m, a, o: o * 0.0)
    torch.testing.assert_close(last(ns["out"]["b"]), last(zeroed), rtol=1e-5, atol=1e-5)
    assert ns["s"] == 0.0  # published in invoke order: the last invoke's


def test_each_item_of_a_loop_of_invokes_has_its_own_list(demo):
    ns = {"model": demo, "prompts": PROMPTS}
    ii.trace(demo, "lists = []\n"
                   "for p in prompts:\n    with tracer.invoke(p):\n        sl = []\n"
                   "        for l in range(4):\n            sl.append(model.transformer.h[l].output)\n"
                   "        lists.append(sl)\n", namespace=ns)
    lists = ns["lists"]
    assert [len(sl) for sl in lists] == [4, 4, 4]
    assert len({id(sl) for sl in lists}) == 3 and ns["sl"] is lists[-1]
    for sl, text in zip(lists, PROMPTS):
        seen = {}
        alone(demo, text, 3, lambda m, a, o: seen.setdefault("h", o))
        torch.testing.assert_close(sl[3][0, -1], seen["h"][0, -1], rtol=1e-5, atol=1e-5)


def test_loop_variables_and_lists_made_between_invokes_are_kept_per_invoke(demo):
    """A grid of rows: `row` is rebound before each inner loop; every invoke appends to the
    row it saw when it was registered (not the last one)."""
    ns = {"model": demo, "prompt": CORRUPT}
    ii.trace(demo, "grid = []\n"
                   "for layer in range(2):\n"
                   "    row = []\n"
                   "    grid.append(row)\n"
                   "    for pos in (-1, -2):\n"
                   "        with tracer.invoke(prompt):\n"
                   "            model.transformer.h[layer].output[:, pos] = 0\n"
                   "            row.append(model.lm_head.output[0, -1])\n", namespace=ns)
    assert [len(r) for r in ns["grid"]] == [2, 2]
    for layer in range(2):
        for j, pos in enumerate((-1, -2)):
            def zero(m, a, o, pos=pos):
                o = o.clone()
                o[:, pos] = 0
                return o
            want = last(alone(demo, CORRUPT, layer, zero))
            torch.testing.assert_close(ns["grid"][layer][j], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["comprehension", "append", "list before the cell"])
@pytest.mark.parametrize("clean_first", [True, False])
def test_the_seeds_one_forward_patching_runs_as_written(demo, form, clean_first):
    collect = {
        "comprehension": "with tracer.invoke(clean):\n"
                         "    clean_hs = [model.transformer.h[l].input for l in range(4)]\n",
        "append": "with tracer.invoke(clean):\n    clean_hs = []\n    for l in range(4):\n"
                  "        clean_hs.append(model.transformer.h[l].input)\n",
        "list before the cell": "with tracer.invoke(clean):\n    for l in range(4):\n"
                                "        clean_hs.append(model.transformer.h[l].input)\n",
    }[form]
    patch = ("for layer in range(4):\n    with tracer.invoke(corrupt):\n"
             "        model.transformer.h[layer].input[:, -3] = clean_hs[layer][:, -3]\n"
             "        results.append(model.lm_head.output[0, -1])\n")
    cell = ("results = []\n" + collect + patch) if clean_first else (
        "results = []\n" + patch + collect)
    ns = {"model": demo, "clean": PROMPT, "corrupt": CORRUPT}
    if form == "list before the cell":
        ns["clean_hs"] = []
    ii.trace(demo, cell, namespace=ns)
    seen = {}
    for layer in range(4):
        alone(demo, PROMPT, layer, lambda m, a, layer=layer: seen.setdefault(layer, a[0]), pre=True)
    assert len(ns["results"]) == 4 and len(ns["clean_hs"]) == 4
    for layer in range(4):
        def patch_in(m, args, layer=layer):
            h = args[0].clone()
            h[:, -3] = seen[layer][:, -3]
            return (h, *args[1:])
        want = last(alone(demo, CORRUPT, layer, patch_in, pre=True))
        torch.testing.assert_close(ns["results"][layer], want, rtol=1e-5, atol=1e-5)
    assert hook_count(demo.module) == 0


@pytest.mark.parametrize("cell, line, words", [
    ("for p in prompts:\n    with tracer.invoke(p):\n        h = model.transformer.h[1].output\n"
     "with tracer.invoke(prompts[0]):\n    model.transformer.h[1].output = h\n", 5,
     "every invoke of the loop at line 1 (one per item)"),
    ("with tracer.invoke(prompts[0]):\n    h = model.transformer.h[1].output\n"
     "with tracer.invoke(prompts[1]):\n    h = model.transformer.h[1].output\n"
     "with tracer.invoke(prompts[2]):\n    model.transformer.h[1].output = h\n", 6,
     "the invoke at line 1 and the invoke at line 3 bind it"),
    ("with tracer.invoke(prompts[0]):\n    h = model.transformer.h[1].output\n"
     "norm = h.norm()\nwith tracer.invoke(prompts[1]):\n    pass\n", 3,
     "before the forward runs"),
])
def test_an_ambiguous_read_stops_the_cell_before_it_runs(demo, cell, line, words):
    ns = {"model": demo, "prompts": PROMPTS}
    weights = checksum(demo.module)
    with pytest.raises(CellSyntaxError) as info:
        ii.trace(demo, cell, namespace=ns)
    assert info.value.line == line and words in str(info.value)
    assert ns == {"model": demo, "prompts": PROMPTS}
    assert hook_count(demo.module) == 0 and checksum(demo.module) == weights


def test_a_failing_invoke_in_a_loop_publishes_nothing(demo):
    ns = {"model": demo, "prompts": PROMPTS, "keep": 1}
    with pytest.raises(ZeroDivisionError):
        ii.trace(demo, "out = []\nfor k, p in enumerate(prompts):\n    keep = k\n"
                       "    with tracer.invoke(p):\n        h = model.transformer.h[1].output\n"
                       "        out.append(1 / (2 - k))\n", namespace=ns)
    assert ns == {"model": demo, "prompts": PROMPTS, "keep": 1}
    assert hook_count(demo.module) == 0


def test_a_read_keeps_its_value_when_the_cell_edits_that_memory_later(demo):
    ns = {"model": demo}
    ii.trace(demo, "pat = model.transformer.h[1].attn.pattern.output\n"
                   "model.transformer.h[1].attn.pattern.output[:, 0] = 0\n"
                   "h1 = model.transformer.h[1].output\n"
                   "model.transformer.h[2].input[:, -1] = 0\n"
                   "logits = model.lm_head.output\n", PROMPT, namespace=ns)
    plain = {"model": demo}
    ii.trace(demo, "pat = model.transformer.h[1].attn.pattern.output\n", PROMPT, namespace=plain)
    assert torch.equal(ns["pat"], plain["pat"])           # not the zeroed head
    assert torch.all(ns["h1"][0, -1] != 0)                # block 2's input edit made on a copy
    edited = {"model": demo}
    ii.trace(demo, "model.transformer.h[1].attn.pattern.output[:, 0] = 0\n"
                   "h1 = model.transformer.h[1].output\n"
                   "model.transformer.h[2].input[:, -1] = 0\n"
                   "logits = model.lm_head.output\n", PROMPT, namespace=edited)
    assert torch.equal(ns["h1"], edited["h1"])            # the read changed nothing
    assert torch.equal(ns["logits"], edited["logits"])


def test_a_read_then_an_edit_keeps_the_gradient_path(demo):
    ns = {"model": demo}
    ii.trace(demo, "h = model.transformer.h[1].output\nh.retain_grad()\n"
                   "model.transformer.h[1].output[:, 0] = 0\n"
                   "logits = model.lm_head.output\nlogits[0, -1, 5].backward()\n",
             PROMPT, namespace=ns, grad=True)
    assert ns["h"].grad is not None and ns["h"].grad[0, -1].abs().sum() > 0
    assert torch.all(ns["h"].grad[0, 0] == 0)  # position 0 was replaced downstream of h


def test_reading_an_item_another_invoke_has_not_filled_yet_says_when_to_read_it(demo):
    ns = {"model": demo, "a": PROMPT, "b": CORRUPT}
    with pytest.raises(IndexError) as info:
        ii.trace(demo, "with tracer.invoke(a):\n"
                       "    hs = [model.transformer.h[l].output for l in range(4)]\n"
                       "with tracer.invoke(b):\n    x = hs[2][:, -1]\n"
                       "    model.transformer.h[2].output[:, -1] = x\n", namespace=ns)
    assert any("line 4 reads `hs`, which another invoke fills" in n for n in info.value.__notes__)
    assert ns == {"model": demo, "a": PROMPT, "b": CORRUPT}
    assert hook_count(demo.module) == 0
