"""Causal tracing equals ROME's procedure written out; attribution patching equals its closed
form computed with autograd by hand; both on GPT-2, NeoX and Llama shapes."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from conftest import CORRUPT, PROMPT, checksum
from sweep_oracle import hand_attribution, logit_diff, naive_causal_trace, serial_neox


@pytest.mark.parametrize("site,window", [("resid_post", 1), ("mlp_out", 3), ("attn_out", 2)])
def test_causal_tracing_equals_rome_procedure(arch_model, site, window):
    arch, model = arch_model
    target = model.token_id("Mary")
    result = ii.patch_sweep(model, PROMPT, metric=ii.prob("Mary"), method="noise", site=site,
                            subject="Mary and John", samples=4, seed=3, window=window)
    kwargs = model.prepare([PROMPT]).kwargs

    def prob(logits):
        return logits[:, -1].float().log_softmax(-1)[:, target].exp()

    expected = naive_causal_trace(model.module, arch, site, kwargs, [2, 3, 4], prob, 3,
                                  samples=4, seed=3, window=window)
    torch.testing.assert_close(result.per_prompt.reshape(expected.shape), expected,
                               atol=1e-5, rtol=0)
    assert result.direction == "causal tracing" and result.extra["window"] == window


def test_causal_tracing_defaults_to_the_clean_prediction(demo):
    from ipy_intervene.demo.data import FACT_TEMPLATES, make_facts

    fact = make_facts()[0]
    prompt = FACT_TEMPLATES[0].format(subject=fact.subject)
    result = ii.patch_sweep(demo, prompt, method="noise", subject=fact.subject, seed=0,
                            site="resid_post")
    assert result.metric == "prob"
    assert result.clean > 0.9 and result.corrupted < 0.6  # the noise hurts the recall
    assert result.values.shape == (4, len(demo.to_str_tokens(prompt)))
    # restoring the last layer's output at the last position is the clean run
    assert result.values[-1, -1] == pytest.approx(1.0, abs=1e-4)
    # before the subject nothing is noised: restoring a state there changes nothing
    assert result.values[:, :2].abs().max() < 1e-5


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "attn_out", "mlp_out",
                                  "head_out", "head_out_pos"])
def test_attribution_equals_closed_form(arch_model, site):
    arch, model = arch_model
    if arch == "neox" and site == "resid_mid":
        model = ii.wrap(serial_neox(len(model.tokenizer)), model.tokenizer)
    good, bad = model.token_id("Mary"), model.token_id("John")
    before = checksum(model.module)
    result = ii.patch_sweep(model, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"), site=site,
                            method="attribution")
    a, b = model.prepare([PROMPT]).kwargs, model.prepare([CORRUPT]).kwargs
    expected = hand_attribution(model.module, arch, site, b, a, logit_diff(good, bad), 3, 4)
    torch.testing.assert_close(result.per_prompt.reshape(expected.shape), expected,
                               atol=1e-5, rtol=1e-5)
    assert checksum(model.module) == before
    assert all(p.grad is None for p in model.module.parameters())
    assert torch.is_grad_enabled()


def test_attribution_approximates_activation_patching_on_the_demo(demo):
    """Not an identity: a first-order estimate that ranks the residual sites like the exact one."""
    args = (demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"))
    exact = ii.patch_sweep(*args, site="resid_pre").values.flatten()
    approx = ii.patch_sweep(*args, site="resid_pre", method="attribution").values.flatten()
    assert torch.corrcoef(torch.stack([exact, approx]))[0, 1] > 0.5


def test_attribution_noising_equals_closed_form(arch_model):
    arch, model = arch_model
    good, bad = model.token_id("Mary"), model.token_id("John")
    result = ii.patch_sweep(model, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"),
                            site="mlp_out", method="attribution", direction="noising")
    a, b = model.prepare([PROMPT]).kwargs, model.prepare([CORRUPT]).kwargs
    expected = hand_attribution(model.module, arch, "mlp_out", a, b, logit_diff(good, bad), 3, 4)
    torch.testing.assert_close(result.per_prompt.reshape(expected.shape), expected,
                               atol=1e-5, rtol=1e-5)
    clean = float(logit_diff(good, bad)(model.module(**a).logits.detach()).mean())
    assert result.clean == pytest.approx(clean, abs=1e-5)
