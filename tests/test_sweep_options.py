"""EAP's and AtP's options in the open, each against its definition: ``direction`` on
``ii.edge_attribution`` (noising: corrupted writes into the clean run, the gradient at the
clean run), ``qk_fix`` / ``grad_drop`` on ``ii.patch_sweep(method="atp*")`` and plain
``method="attribution"`` on a head's q/k/v: ``(source - base) . d metric / d x`` with
attention written out by hand."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import ipy_intervene as ii
from conftest import CORRUPT, PROMPT, checksum, hook_count
from ipy_intervene.errors import InputError
from ipy_intervene.sweep import atp_star
from test_atp_star import loud_model  # noqa: F401 - the fixture: effects well above 1e-5
from edges_oracle import scores_by_hand
from test_edges import ARCHS4, CLEAN, CORRUPTED, METRIC, Hand, build, grads_by_hand, writes

GOOD, BAD = 5, 7


# -- EAP direction -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS4)
def test_noising_eap_equals_its_closed_form(demo, arch):
    """(corrupted_u - clean_u) . d metric / d input_v at the clean run."""
    model = ii.wrap(build(arch, len(demo.tokenizer)), demo.tokenizer)
    hand = Hand(arch, model)
    result = ii.edge_attribution(model, CLEAN, CORRUPTED, METRIC, direction="noising")
    clean, corrupt = writes(hand, CLEAN), writes(hand, CORRUPTED)
    want = scores_by_hand(grads_by_hand(hand, CLEAN), corrupt, clean, result.graph)
    assert float(want.nan_to_num().abs().max()) > 0.05
    assert torch.allclose(result.scores.nan_to_num(), want.nan_to_num(), atol=1e-5, rtol=0)
    denoising = ii.edge_attribution(model, CLEAN, CORRUPTED, METRIC)
    assert (result.clean_metric, result.corrupted_metric) == pytest.approx(
        (denoising.clean_metric, denoising.corrupted_metric), abs=1e-5)
    assert result.direction == "noising" and denoising.direction == "denoising"


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_noising_is_denoising_with_the_runs_swapped(demo, method):
    noising = ii.edge_attribution(demo, CLEAN, CORRUPTED, METRIC, method=method, steps=3,
                                  direction="noising")
    swapped = ii.edge_attribution(demo, CORRUPTED, CLEAN, METRIC, method=method, steps=3)
    assert torch.equal(noising.per_prompt, swapped.per_prompt)
    denoising = ii.edge_attribution(demo, CLEAN, CORRUPTED, METRIC, method=method, steps=3)
    assert float((noising.scores - denoising.scores).nan_to_num().abs().max()) > 1e-3


def test_unknown_eap_direction_is_a_clear_error(demo):
    with pytest.raises(InputError, match="direction must be one of 'denoising', 'noising'"):
        ii.edge_attribution(demo, CLEAN, CORRUPTED, METRIC, direction="backwards")


# -- qk_fix / grad_drop on patch_sweep -------------------------------------------------------


@pytest.mark.parametrize("qk_fix", [True, False])
@pytest.mark.parametrize("grad_drop", [True, False])
def test_atp_switches_on_patch_sweep_are_atp_stars(demo, qk_fix, grad_drop):
    metric = ii.logit_diff("Mary", "John")
    ours = ii.patch_sweep(demo, PROMPT, CORRUPT, metric, site="head_q", method="atp*",
                          qk_fix=qk_fix, grad_drop=grad_drop)
    theirs = atp_star.sweep(demo, PROMPT, CORRUPT, metric, site="head_q", qk_fix=qk_fix,
                            grad_drop=grad_drop)
    assert torch.equal(ours.values, theirs.values)
    assert (ours.extra["qk_fix"], ours.extra["grad_drop"]) == (qk_fix, grad_drop)


def test_qk_fix_changes_the_estimate_and_grad_drop_gives_magnitudes(demo):
    metric = ii.logit_diff("Mary", "John")
    runs = {(q, g): ii.patch_sweep(demo, PROMPT, CORRUPT, metric, site="head_k", method="atp*",
                                   qk_fix=q, grad_drop=g)
            for q in (True, False) for g in (True, False)}
    assert float((runs[True, False].raw - runs[False, False].raw).abs().max()) > 1e-4
    assert bool((runs[True, True].values >= -1e-6).all())          # denoising magnitudes
    assert not bool((runs[True, False].values >= 0).all())         # the signed estimate


@pytest.mark.parametrize("call", [dict(method="attribution", qk_fix=False),
                                  dict(method="activation", grad_drop=True),
                                  dict(method="atp*", qk_fix="no")])
def test_atp_switches_elsewhere_are_a_clear_error(demo, call):
    hooks, weights = hook_count(demo.module), checksum(demo.module)
    with pytest.raises(InputError, match="qk_fix|grad_drop"):
        ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"), site="head_q",
                       **call)
    assert hook_count(demo.module) == hooks and checksum(demo.module) == weights


# -- plain attribution on q / k / v ----------------------------------------------------------


def attention_by_hand(model, tokens, grad):
    """The metric, and every layer's q, k, v as the attention receives them."""
    seen = {}

    def attend(module, q, k, v, mask, scaling=None, **kwargs):
        rep = q.shape[1] // k.shape[1]
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale
        pattern = (scores + (0 if mask is None else mask)).softmax(-1)
        seen[module.layer_idx] = dict(q=q, k=k, v=v)
        return (pattern @ v.repeat_interleave(rep, 1)).transpose(1, 2), pattern

    AttentionInterface.register("ii_options_by_hand", attend)
    AttentionMaskInterface.register("ii_options_by_hand", eager_mask)
    before = model.module.config._attn_implementation
    model.module.set_attn_implementation("ii_options_by_hand")
    try:
        with torch.set_grad_enabled(grad):
            logits = model.module(input_ids=tokens).logits
    finally:
        model.module.set_attn_implementation(before)
    return logits[0, -1, GOOD] - logits[0, -1, BAD], seen


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("per_position", [True, False])
def test_head_qkv_attribution_is_the_gradient_times_the_change(loud_model, name, per_position):
    arch, model = loud_model
    site = f"head_{name}_pos" if per_position else f"head_{name}"
    result = ii.patch_sweep(model, PROMPT, CORRUPT, ii.logit_diff(GOOD, BAD), site=site,
                            method="attribution")
    ids = {t: model.tokenizer(t, return_tensors="pt").input_ids for t in (PROMPT, CORRUPT)}
    _, clean = attention_by_hand(model, ids[PROMPT], grad=False)
    score, base = attention_by_hand(model, ids[CORRUPT], grad=True)
    values = [base[l][name] for l in range(len(base))]
    grads = torch.autograd.grad(score, values)
    per = [((clean[l][name] - x.detach()) * g).sum(-1)[0] for l, (x, g) in
           enumerate(zip(values, grads))]                                   # [H, P] per layer
    expected = torch.stack([p.T if per_position else p.sum(-1) for p in per])
    assert result.method == "attribution" and result.raw.shape == expected.shape
    torch.testing.assert_close(result.raw - result.corrupted, expected, atol=1e-5, rtol=0)
    assert expected.abs().max() > 1e-3
