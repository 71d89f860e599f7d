"""A value a cell reads that the model then changes in place would be published wrong, and so
would anything the cell computes from it afterwards. On parallel Falcon the block adds
attention's output into the MLP's output tensor (``mlp_output += attention_output``) after the
MLP's hook: the architecture layer knows it, so reads of the MLP's output are copies, equal to
plain hooks. On a model the layer does not know, the first such read fails the cell at its line
(nothing published, no hook left) and later reads of that site are copies. The cell's own
writes to what it read are not the model's changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ipy_intervene as ii
from ipy_intervene.errors import SiteError
from ipy_intervene.tracing.trace import trace

from conftest import checksum, hook_count
from test_families_maps import family

PROMPT = "When Mary and John went to the store"


@pytest.fixture(scope="module")
def falcon(demo):
    return family("falcon", demo)


def mlp_output_by_hand(model) -> torch.Tensor:
    seen = {}
    handle = model.module.transformer.h[0].mlp.register_forward_hook(
        lambda m, a, out: seen.__setitem__("out", out.clone()))
    try:
        with torch.no_grad():
            model.module(**model.tokenizer(PROMPT, return_tensors="pt"))
    finally:
        handle.remove()
    return seen["out"]


@pytest.mark.parametrize("cell", [
    "h = model.transformer.h[0].mlp.output\nn = h.norm(dim=-1)\n",
    # computed from the read after the model changed it (the reviewer's cases)
    "x = model.transformer.h[0].mlp.output\nb = model.transformer.h[0].output\n"
    "n = x.norm(dim=-1)\nh = x\n",
    "xs = [model.transformer.h[l].mlp.output for l in range(2)]\n"
    "logits = model.lm_head.output\nn = xs[0].norm(dim=-1)\nh = xs[0]\n",
])
def test_falcon_s_mlp_output_reads_equal_plain_hooks(falcon, cell):
    ns = {"model": falcon}
    trace(falcon, cell, PROMPT, namespace=ns)
    want = mlp_output_by_hand(falcon)
    torch.testing.assert_close(ns["h"], want, atol=0, rtol=0)
    torch.testing.assert_close(ns["n"], want.norm(dim=-1), atol=0, rtol=0)


class AddsIntoItsChild(nn.Module):
    """A model the architecture layer does not know: after its child ``inner`` has run, it
    adds into that child's output and scales that child's input, both in place."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre, self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        y = self.inner(h)
        y += 1.0
        h.mul_(2.0)
        return self.head(y + h)


@pytest.mark.parametrize("cell, label, want", [
    ("h = model.inner.output\n", "inner.output", lambda m, x: m.inner(m.pre(x))),
    ("x = model.inner.output\nout = model.head.output\nh = x * 1\n", "inner.output",
     lambda m, x: m.inner(m.pre(x))),
    ("h = model.inner.input\n", "inner.input", lambda m, x: m.pre(x)),
])
def test_an_unknown_model_s_in_place_change_fails_the_cell_once_then_reads_are_copies(cell,
                                                                                     label,
                                                                                     want):
    model = ii.wrap(AddsIntoItsChild())
    x = torch.randn(2, 4)
    before = checksum(model.module)
    ns = {"model": model}
    with pytest.raises(SiteError, match=rf"line 1: the model changed `{label}` in place after "
                                        r"this line read it.*nothing is published. Reads of "
                                        r"this site now get a copy: run the cell again"):
        trace(model, cell, x, namespace=ns)
    assert "h" not in ns and "x" not in ns
    assert hook_count(model.module) == 0 and checksum(model.module) == before
    trace(model, cell, x, namespace=ns)
    with torch.no_grad():
        torch.testing.assert_close(ns["h"], want(model.module, x), atol=0, rtol=0)


def test_the_cells_own_write_to_what_it_read_is_not_the_models_change(demo):
    ns = {"model": demo}
    cell = ("h = model.transformer.h[0].output\n"
            "h[:, -1] = 0\n"
            "m = model.transformer.h[1].mlp.output\n")
    trace(demo, cell, PROMPT, namespace=ns)
    assert float(ns["h"][:, -1].abs().sum()) == 0 and ns["m"].shape[-1] == 128
