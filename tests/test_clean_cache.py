"""Recorded runs kept across cells (sweep/clean_runs.py): a repeated sweep reuses the clean and
corrupted recordings and gives the same result; any change of the weights, the inputs, a
recorded tensor or a hook on the model means a fresh run; memory stays bounded."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.sites import SITES, adapter_for
from ipy_intervene.sweep import api, clean_runs
from ipy_intervene.sweep.record import record
from conftest import CORRUPT, PROMPT, tiny_model

MARY_JOHN = ii.logit_diff("Mary", "John")


@pytest.fixture
def model(demo):
    """A fresh tiny GPT-2 (weights this test may change), the demo tokenizer."""
    clean_runs.forget()
    yield ii.wrap(tiny_model("gpt2", len(demo.tokenizer)), demo.tokenizer)
    clean_runs.forget()


def sweep(model, clean=PROMPT, corrupted=CORRUPT, **kw):
    """The sweep without the whole-result memo (ii.patch_sweep has it): recordings only."""
    return api.patch_sweep(model, clean, corrupted, MARY_JOHN, **kw)


def fresh(model, **kw):
    """The sweep with nothing kept from before."""
    clean_runs.forget()
    return sweep(model, **kw)


def test_a_repeated_sweep_reuses_both_recordings_and_gives_the_same_values(model):
    first = sweep(model)
    assert clean_runs.stats()["misses"] == 2 and clean_runs.stats()["hits"] == 0
    second = sweep(model)
    assert clean_runs.stats()["hits"] == 2 and clean_runs.stats()["misses"] == 2
    assert torch.equal(first.values, second.values) and torch.equal(first.raw, second.raw)
    assert (first.clean, first.corrupted) == (second.clean, second.corrupted)
    heads = sweep(model, site="head_out")            # other sites: their own recordings
    assert torch.equal(heads.values, fresh(model, site="head_out").values)
    assert first.top(3) == second.top(3)


@pytest.mark.parametrize("change", ["add_", "data", "load_state_dict", "dtype_roundtrip"])
def test_any_weight_change_means_a_fresh_run(model, change):
    before = sweep(model)
    weight = model.module.transformer.h[1].mlp.c_fc.weight
    with torch.no_grad():
        if change == "add_":
            weight.add_(0.5)
        elif change == "data":
            weight.data = weight.data + 0.5
        elif change == "load_state_dict":
            state = {k: v.clone() for k, v in model.module.state_dict().items()}
            state["transformer.h.1.mlp.c_fc.weight"] += 0.5
            model.module.load_state_dict(state)
        else:
            model.module.double().float()
            weight = model.module.transformer.h[1].mlp.c_fc.weight
            weight.add_(0.5)
    hits = clean_runs.stats()["hits"]
    after = sweep(model)
    assert clean_runs.stats()["hits"] == hits                     # nothing reused
    assert not torch.equal(after.raw, before.raw)
    assert torch.equal(after.raw, fresh(model).raw)


def test_changing_a_weight_and_back_never_brings_the_stale_run_back(model):
    original = sweep(model)
    weight = model.module.transformer.h[0].attn.c_attn.weight
    with torch.no_grad():
        weight.mul_(2.0)
    changed = sweep(model)
    with torch.no_grad():
        weight.div_(2.0)
    back = sweep(model)
    assert clean_runs.stats()["hits"] == 0
    assert not torch.equal(changed.raw, original.raw)
    torch.testing.assert_close(back.raw, original.raw, rtol=0, atol=1e-6)


def test_other_inputs_and_a_recording_changed_in_place_are_not_reused(model):
    adapter = adapter_for(model)
    kwargs = model.prepare([PROMPT]).kwargs
    ask = dict(kind=SITES["resid_pre"], layers=[0, 1], positions=None)
    with torch.no_grad():
        a = record(model, adapter, kwargs, **ask)
        expected = a.logits.clone()
        other = record(model, adapter, model.prepare([CORRUPT]).kwargs, **ask)
        assert clean_runs.stats()["hits"] == 0 and not torch.equal(other.logits, expected)
        a.logits.add_(1.0)                                  # a caller edits the recording
        b = record(model, adapter, kwargs, **ask)
        assert torch.equal(b.logits, expected) and clean_runs.stats()["hits"] == 0
        c = record(model, adapter, kwargs, **ask)
        assert clean_runs.stats()["hits"] == 1 and c.logits is b.logits
        c.sites[0] = None                                   # containers are the caller's own
        assert record(model, adapter, kwargs, **ask).sites[0] is not None


def test_hooks_grad_training_and_noise_mean_a_fresh_run(model):
    adapter = adapter_for(model)
    kwargs = model.prepare([PROMPT]).kwargs
    ask = dict(kind=SITES["resid_pre"], layers=[0], positions=None)
    seen = []
    handle = model.module.transformer.h[2].register_forward_hook(
        lambda m, a, out: seen.append(1))
    try:
        with torch.no_grad():
            record(model, adapter, kwargs, **ask)
            record(model, adapter, kwargs, **ask)
    finally:
        handle.remove()
    assert len(seen) == 2 and clean_runs.stats() == {"hits": 0, "misses": 0, "entries": 0,
                                                     "bytes": 0}
    record(model, adapter, kwargs, **ask)                   # grad on
    model.module.train()
    try:
        with torch.no_grad():
            record(model, adapter, kwargs, **ask)
    finally:
        model.module.eval()
    with torch.no_grad():
        noise = torch.zeros(1, kwargs["input_ids"].shape[1], 32)
        record(model, adapter, kwargs, **ask, noise=noise)
        record(model, adapter, kwargs, **ask, noise=noise)
    assert clean_runs.stats()["entries"] == 0


def test_memory_stays_bounded(model, monkeypatch):
    names = ["Mary", "John", "Tom", "James", "Dan", "Sid"]
    for name in names:
        sweep(model, clean=PROMPT.replace("store", name), corrupted=CORRUPT.replace("store", name))
    assert clean_runs.stats()["entries"] == clean_runs.MAX_ENTRIES
    one = clean_runs.stats()["bytes"] // clean_runs.MAX_ENTRIES
    monkeypatch.setattr(clean_runs, "MAX_BYTES", one * 2 + 1)
    sweep(model, clean=PROMPT.replace("store", "park"), corrupted=CORRUPT.replace("store", "park"))
    assert clean_runs.stats()["bytes"] <= one * 2 + 1 and clean_runs.stats()["entries"] <= 2


def test_a_model_that_is_gone_leaves_nothing_behind(demo):
    import gc
    import weakref

    clean_runs.forget()
    model = ii.wrap(tiny_model("gpt2", len(demo.tokenizer)), demo.tokenizer)
    sweep(model)
    assert clean_runs.stats()["entries"] == 2
    gone = weakref.ref(model.module)
    del model
    gc.collect()
    assert gone() is None                      # the kept recordings do not hold the model
    assert clean_runs.stats()["entries"] == 0   # and are dropped with it
    other = ii.wrap(tiny_model("gpt2", len(demo.tokenizer)), demo.tokenizer)
    sweep(other)
    assert clean_runs.stats()["hits"] == 0 and clean_runs.stats()["entries"] == 2
    clean_runs.forget()


# -- whole sweeps (sweep/memo.py): an identical sweep returns the earlier result ----------------

from ipy_intervene.sweep import memo  # noqa: E402


@pytest.fixture
def remembered():
    memo.forget()
    yield memo.memoized(api.patch_sweep)
    memo.forget()


def test_an_identical_sweep_returns_the_earlier_result(model, remembered):
    first = remembered(model, PROMPT, CORRUPT, MARY_JOHN)
    second = remembered(model, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"))  # equal metric
    assert memo.stats()["hits"] == 1 and second.extra.get("reused") is True
    assert "reused" not in first.extra
    assert torch.equal(second.raw, first.raw) and torch.equal(second.raw, fresh(model).raw)
    assert second.patcher.top_tokens((1, 3)) == first.patcher.top_tokens((1, 3))  # views work
    remembered(model, PROMPT, CORRUPT, MARY_JOHN, site="mlp_out")   # other options: run
    remembered(model, PROMPT, CORRUPT, ii.logit_diff("John", "Mary"))  # other answers: run
    remembered(model, [PROMPT], [CORRUPT], MARY_JOHN)            # other INPUT: run
    assert memo.stats()["hits"] == 1 and memo.stats()["misses"] == 4


def test_a_weight_change_or_an_edited_result_means_a_fresh_sweep(model, remembered):
    first = remembered(model, PROMPT, CORRUPT, MARY_JOHN)
    with torch.no_grad():
        model.module.transformer.h[2].mlp.c_proj.weight.add_(0.3)
    after = remembered(model, PROMPT, CORRUPT, MARY_JOHN)
    assert memo.stats()["hits"] == 0 and not torch.equal(after.raw, first.raw)
    after.values[0, 0] = 123.0                 # the user edits a result: not what is kept
    again = remembered(model, PROMPT, CORRUPT, MARY_JOHN)
    assert float(again.values[0, 0]) != 123.0 and torch.equal(again.raw, after.raw)


def test_callable_metrics_hooks_and_training_always_run(model, remembered):
    calls = []

    def metric(logits):
        calls.append(1)
        return logits[:, -1, 5] - logits[:, -1, 6]

    remembered(model, PROMPT, CORRUPT, metric)
    n = len(calls)
    remembered(model, PROMPT, CORRUPT, metric)
    assert len(calls) == 2 * n and memo.stats() == {"hits": 0, "misses": 0, "entries": 0}
    handle = model.module.transformer.h[0].register_forward_hook(lambda m, a, o: None)
    try:
        remembered(model, PROMPT, CORRUPT, MARY_JOHN)
        remembered(model, PROMPT, CORRUPT, MARY_JOHN)
    finally:
        handle.remove()
    assert memo.stats()["hits"] == 0 and memo.stats()["entries"] == 0
    assert memo.metric_key(ii.prob("Mary")) == ("Prob", ("Mary",))
    assert memo.metric_key(metric) is None


def test_ii_patch_sweep_remembers_a_sweep_without_keeping_its_model_alive(demo):
    import gc
    import weakref

    memo.forget()
    model = ii.wrap(tiny_model("gpt2", len(demo.tokenizer)), demo.tokenizer)
    first = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    again = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    assert again.extra.get("reused") is True and torch.equal(again.raw, first.raw)
    assert again.patcher.top_tokens((0, 0)) == first.patcher.top_tokens((0, 0))
    gone = weakref.ref(model.module)
    del model, first, again
    gc.collect()
    assert gone() is None
    memo.forget()


@pytest.mark.parametrize("edit", ["data_mul", "data_setitem", "swap_activation"])
def test_edits_that_keep_the_version_still_mean_a_fresh_sweep(demo, edit):
    """`p.data` edits keep `p._version`; a swapped submodule has no weights: both count."""
    memo.forget()
    clean_runs.forget()
    model = ii.wrap(tiny_model("gpt2", len(demo.tokenizer)), demo.tokenizer)
    ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    block = model.module.transformer.h[1]
    if edit == "data_mul":
        block.mlp.c_fc.weight.data.mul_(0.5)
    elif edit == "data_setitem":
        block.mlp.c_fc.weight.data[0] = 1.0
    else:
        block.mlp.act = torch.nn.ReLU().eval()
    after = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    assert "reused" not in after.extra and clean_runs.stats()["hits"] == 0
    assert torch.equal(after.raw, fresh(model).raw)
    memo.forget()


def test_a_reused_result_has_values_of_its_own(model):
    memo.forget()
    first = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    second = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    assert second.extra.get("reused") is True
    kept = first.values.clone()
    second.values.sub_(1.0)                       # the user edits one result
    assert torch.equal(first.values, kept)
    third = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    assert torch.equal(third.values, kept)
    memo.forget()
