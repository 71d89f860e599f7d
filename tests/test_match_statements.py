"""``match`` statements in cells: a name an invoke binds in a case is read by another invoke,
and a site inside a case enters the graph (validated before anything runs)."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import SiteError
from conftest import CORRUPT, PROMPT, hook_count

CELL = """
with tracer.invoke(a):
    match mode:
        case "read" if model.transformer.h[0].output.shape[0] == 1:
            h = model.transformer.h[1].output[:, -1]
        case _:
            h = None
with tracer.invoke(b):
    model.transformer.h[2].output[:, -1] = h
    out = model.lm_head.output[:, -1]
"""


def by_hand(demo):
    """Block 1's last position of PROMPT written into block 2's of CORRUPT, one at a time."""
    seen = {}
    module, ids = demo.module, lambda t: demo.tokenizer(t, return_tensors="pt").input_ids
    handle = module.transformer.h[1].register_forward_hook(
        lambda m, a, o: seen.update(h=o[:, -1].clone()))
    try:
        with torch.no_grad():
            module(ids(PROMPT))
    finally:
        handle.remove()

    def write(m, a, o):
        o = o.clone()
        o[:, -1] = seen["h"]
        return o
    handle = module.transformer.h[2].register_forward_hook(write)
    try:
        with torch.no_grad():
            return module(ids(CORRUPT)).logits[:, -1]
    finally:
        handle.remove()


def test_a_name_bound_in_a_case_is_read_by_another_invoke(demo):
    ns = {"model": demo, "a": PROMPT, "b": CORRUPT, "mode": "read"}
    ii.trace(demo, CELL, namespace=ns)
    torch.testing.assert_close(ns["out"], by_hand(demo), rtol=1e-5, atol=1e-5)
    assert hook_count(demo.module) == 0


def test_a_site_inside_a_case_is_validated_before_the_run(demo):
    calls = []
    handle = demo.module.transformer.wte.register_forward_hook(lambda *a: calls.append(1))
    ns = {"model": demo, "mode": "read"}
    try:
        with pytest.raises(SiteError, match="line 4: layer index 9 is past the end"):
            ii.trace(demo, "match mode:\n    case 'read':\n        x = 1\n"
                           "        h = model.transformer.h[9].output\n", PROMPT, namespace=ns)
    finally:
        handle.remove()
    assert calls == [] and "h" not in ns and hook_count(demo.module) == 0


def test_sites_in_a_case_guard_and_body_are_in_the_graph(demo):
    result = ii.trace(demo, CELL, namespace={"model": demo, "a": PROMPT, "b": CORRUPT,
                                             "mode": "read"})
    lines = {site.line for site in result.graph.sites}
    assert {4, 5} <= lines
