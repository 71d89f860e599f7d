"""Whole sweeps kept across cells (sweep/memo.py): an identical sweep returns the earlier
result only once a forward run now proves it current (the witness); any change of the model
that changes what it computes, be it a weight, an attribute, a config field or code, means a
fresh sweep; recorded clean/corrupted runs are never kept across sweeps."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.sweep import api, memo, proof, record as record_module
from conftest import CORRUPT, PROMPT, tiny_model

MARY_JOHN = ii.logit_diff("Mary", "John")


@pytest.fixture(autouse=True)
def keep_every_sweep(monkeypatch):
    """The tiny models' sweeps take milliseconds: keep them anyway (see MIN_SECONDS)."""
    monkeypatch.setattr(memo, "MIN_SECONDS", 0.0)


@pytest.fixture
def model(demo):
    """A fresh tiny GPT-2 (weights this test may change), the demo tokenizer."""
    memo.forget()
    yield ii.wrap(tiny_model("gpt2", len(demo.tokenizer)), demo.tokenizer)
    memo.forget()


def fresh(model, **kw):
    """The sweep with nothing kept from before (``api.patch_sweep`` has no memo)."""
    return api.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN, **kw)


def test_recorded_runs_are_not_kept_across_sweeps(model, monkeypatch):
    calls = []
    original = record_module.record
    monkeypatch.setattr(api, "record", lambda *a, **k: calls.append(1) or original(*a, **k))
    api.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    first = len(calls)
    api.patch_sweep(model, PROMPT, CORRUPT, ii.prob("Mary"))   # another metric: runs recorded
    assert first == 2 and len(calls) == 2 * first


@pytest.mark.parametrize("change", ["add_", "data", "load_state_dict", "dtype_roundtrip"])
def test_any_weight_change_means_a_fresh_sweep(model, change):
    before = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
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
    after = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    assert "reused" not in after.extra and memo.stats()["hits"] == 0
    assert not torch.equal(after.raw, before.raw)
    assert torch.equal(after.raw, fresh(model).raw)


def test_changing_a_weight_and_back_is_proven_current_again(model):
    original = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    weight = model.module.transformer.h[0].attn.c_attn.weight
    with torch.no_grad():
        weight.mul_(2.0)
    changed = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    with torch.no_grad():
        weight.div_(2.0)
    back = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    assert not torch.equal(changed.raw, original.raw)
    assert torch.equal(back.raw, fresh(model).raw)


def test_what_no_checksum_sees_is_refuted_by_the_witness(model):
    """An attribute the forward reads (``ln_f.eps``) is no weight: the cheap checks pass,
    the witness's forward differs, and the sweep runs again."""
    first = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    model.module.transformer.ln_f.eps = 0.5
    after = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    assert memo.stats()["refuted"] == 1 and "reused" not in after.extra
    assert not torch.equal(after.raw, first.raw)
    assert torch.equal(after.raw, fresh(model).raw)


def test_order_sensitive_checksum_sees_a_permutation():
    w = torch.randn(5, 7)
    assert proof.checksum(w) == proof.checksum(w.clone())
    assert proof.checksum(w) != proof.checksum(w[[1, 0, 2, 3, 4]])
    assert proof.checksum(w) != proof.checksum(w.roll(3))
    half = w.half()
    assert proof.checksum(half) != proof.checksum(half.flip(0))


def test_a_reused_result_says_so_in_its_repr_and_view(model):
    ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    again = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    from ipy_intervene.widgets.heatmap import sweep_title

    assert again.extra.get("reused") is True
    assert "reused" in repr(again) and "reused" in sweep_title(again)


# -- whole sweeps (sweep/memo.py): an identical sweep returns the earlier result ----------------

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
    assert len(calls) == 2 * n and memo.stats() == {"hits": 0, "misses": 0, "refuted": 0,
                                             "entries": 0}
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
    assert "reused" not in after.extra and memo.stats()["hits"] == 0
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


def test_a_quick_sweep_is_not_kept_and_pays_for_no_proof(model, monkeypatch):
    monkeypatch.setattr(memo, "MIN_SECONDS", 1e9)
    proofs = []
    original = proof.Witness.of
    monkeypatch.setattr(proof.Witness, "of", lambda *a: proofs.append(1) or original(*a))
    ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    again = ii.patch_sweep(model, PROMPT, CORRUPT, MARY_JOHN)
    assert "reused" not in again.extra and memo.stats()["entries"] == 0 and proofs == []
