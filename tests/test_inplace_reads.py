"""A value a cell reads that the model then changes in place would be published wrong: on
parallel Falcon the block adds attention's output into the MLP's output tensor
(``mlp_output += attention_output``) after the MLP's hook. Such a read is an error at its
line when a name would hold it; the failed cell publishes nothing and leaves no hook;
``.clone()`` keeps the value, equal to plain hooks; a value used at once and not kept is no
error. The cell's own writes to what it read are not the model's changes."""

from __future__ import annotations

import pytest
import torch

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


def test_a_read_the_model_then_changes_in_place_is_an_error_at_its_line(falcon):
    ns = {"model": falcon}
    before = checksum(falcon.module)
    cell = "x = 1\nh = model.transformer.h[0].mlp.output\n"
    with pytest.raises(SiteError, match=r"line 2: `h` holds `transformer.h\[0\].mlp.output` "
                                        r"as this line read it, but the model changed that "
                                        r"tensor in place afterwards.*Read "
                                        r"`transformer.h\[0\].mlp.output.clone\(\)`"):
        trace(falcon, cell, PROMPT, namespace=ns)
    assert "h" not in ns and "x" not in ns
    assert hook_count(falcon.module) == 0 and checksum(falcon.module) == before


def test_clone_keeps_the_value_the_site_had(falcon):
    ns = {"model": falcon}
    trace(falcon, "h = model.transformer.h[0].mlp.output.clone()\n", PROMPT, namespace=ns)
    torch.testing.assert_close(ns["h"], mlp_output_by_hand(falcon), atol=0, rtol=0)


def test_the_cells_own_write_to_what_it_read_is_not_the_models_change(demo):
    ns = {"model": demo}
    cell = ("h = model.transformer.h[0].output\n"
            "h[:, -1] = 0\n"
            "m = model.transformer.h[1].mlp.output\n")
    trace(demo, cell, PROMPT, namespace=ns)
    assert float(ns["h"][:, -1].abs().sum()) == 0 and ns["m"].shape[-1] == 128


def test_a_read_used_at_once_and_not_kept_is_no_error(falcon):
    ns = {"model": falcon}
    trace(falcon, "n = model.transformer.h[0].mlp.output.norm()\n", PROMPT, namespace=ns)
    assert float(ns["n"]) == pytest.approx(float(mlp_output_by_hand(falcon).norm()), rel=1e-6)
