"""``--dry-run`` runs the cell on fake tensors: shapes and indices are checked before the
model runs, nothing is computed or published, and your own hooks are not called."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import SiteError, ValueMismatchError
from conftest import PROMPT, hook_count


@pytest.fixture
def watched(demo):
    calls = []
    handle = demo.module.transformer.h[1].register_forward_hook(lambda *a: calls.append(1))
    yield demo, calls
    handle.remove()
    assert hook_count(demo.module) == 0


def test_dry_run_reports_shapes_and_publishes_nothing(watched):
    model, calls = watched
    ns = {"model": model}
    result = ii.trace(model, "h = model.transformer.h[1].output\n"
                             "model.transformer.h[2].output[:, -1] = 0\n"
                             "logits = model.lm_head.output\n", PROMPT, namespace=ns,
                      dry_run=True)
    assert ns == {"model": model} and calls == []
    shapes = [site.visits[0].shape for site in result.graph.module_sites()]
    assert shapes == [(1, 15, 128), (1, 15, 128), (1, 15, 198)]
    assert "nothing computed or published" in result.summary()


def test_a_position_past_the_prompt_is_found_before_the_model_runs(watched):
    model, calls = watched
    ns = {"model": model}
    with pytest.raises(SiteError, match=r"line 2: position 40 is past the prompt: the "
                                         r"prompt is 15 tokens long") as info:
        ii.trace(model, "h = model.transformer.h[1].output\nx = h[:, 40]\n", PROMPT,
                 namespace=ns, dry_run=True)
    assert isinstance(info.value, IndexError)  # `except IndexError` still catches it
    assert ns == {"model": model} and calls == []


def test_a_write_of_the_wrong_shape_is_found_before_the_model_runs(watched):
    model, _ = watched
    with pytest.raises(ValueMismatchError) as info:
        ii.trace(model, "x = 1\nmodel.transformer.h[1].output = torch.zeros(1, 3, 128)\n",
                 PROMPT, namespace={"model": model, "torch": torch}, dry_run=True)
    assert info.value.line == 2


def test_branching_on_a_value_stops_the_dry_run_with_a_note(watched):
    model, calls = watched
    ns = {"model": model}
    result = ii.trace(model, "h = model.transformer.h[1].output\n"
                             "if h.norm() > 3:\n"
                             "    model.transformer.h[2].output[:] = 0\n", PROMPT, namespace=ns,
                      dry_run=True)
    assert "stopped at line 2" in result.note
    assert ns == {"model": model} and calls == []


def test_a_dry_run_runs_a_spliced_dictionary_and_still_sets_your_hooks_aside(watched):
    model, calls = watched
    ii.attach(model, model.transformer.h[2], ii.load_sae("demo"))
    try:
        result = ii.trace(model, "lat = model.transformer.h[2].sae.latents.output\n"
                                 "model.transformer.h[2].sae.latents.output[:, -1, 5] = 0\n",
                          PROMPT, namespace={"model": model}, dry_run=True)
        sites = [s for s in result.graph.sites if s.visits]
        assert [s.visits[0].shape for s in sites] == [(1, 15, 512), (1, 15, 512)]
        assert calls == []
    finally:
        ii.detach(model)
    assert hook_count(model.module) == 1  # your hook, back; the splice's is gone
