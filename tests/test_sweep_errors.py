"""Bad sweep input gets a clear error and loses nothing: no hook left, weights unchanged,
grad mode restored, the next sweep gives the same result."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError, SiteError
from conftest import CORRUPT, PROMPT, checksum, hook_count, tiny_model

METRIC = ii.logit_diff("Mary", "John")


@pytest.fixture
def unchanged(demo):
    """Asserts, after the test, that the demo model is exactly as before and hook-free."""
    before = checksum(demo.module)
    yield demo
    assert hook_count(demo.module) == 0
    assert checksum(demo.module) == before
    assert torch.is_grad_enabled()


def test_different_token_lengths_are_an_error_naming_both(unchanged):
    longer = CORRUPT + " John"
    with pytest.raises(InputError) as info:
        ii.patch_sweep(unchanged, PROMPT, longer, METRIC)
    message = str(info.value)
    assert "prompt 0 have different token lengths (15 vs 16 tokens)" in message
    assert "'to', 'John']" in message and "Reword one" in message


def test_different_padding_in_a_batch_is_an_error(unchanged):
    clean = [PROMPT, "Then , Mary and John had a drink"]
    corrupt = [CORRUPT, "Then , Mary and John had a drink to"]
    with pytest.raises(InputError, match="prompt 1 have different token lengths"):
        ii.patch_sweep(unchanged, clean, corrupt, METRIC)


def test_prompt_counts_must_match(unchanged):
    with pytest.raises(InputError, match="2 clean prompt.* but 1 corrupted"):
        ii.patch_sweep(unchanged, [PROMPT, PROMPT], CORRUPT, METRIC)


def test_an_unknown_family_is_discovered_or_taken_by_hand_and_sweeps_as_its_twin(demo):
    """A family the table lacks is mapped from its module tree (refusals of trees discovery
    cannot read: tests/test_families_maps.py); a hand map gives the same sweep."""
    module = tiny_model("gpt2", len(demo.tokenizer))
    module.config.model_type = "mystery"
    model = ii.wrap(module, demo.tokenizer)
    discovered = ii.patch_sweep(model, PROMPT, CORRUPT, METRIC, site="mlp_out")
    by_hand = ii.Adapter("mine", blocks="transformer.h", final_norm="transformer.ln_f",
                         unembed="lm_head", embed="transformer.wte", attn="attn", mlp="mlp",
                         mid_norm="ln_2", head_proj="attn.c_proj", n_heads=4)
    result = ii.patch_sweep(model, PROMPT, CORRUPT, METRIC, site="mlp_out", adapter=by_hand)
    module.config.model_type = "gpt2"
    expected = ii.patch_sweep(model, PROMPT, CORRUPT, METRIC, site="mlp_out")
    torch.testing.assert_close(result.raw, expected.raw)
    torch.testing.assert_close(discovered.raw, expected.raw)


def test_resid_mid_on_a_parallel_residual_model(demo):
    model = ii.wrap(tiny_model("neox", len(demo.tokenizer)), demo.tokenizer)
    with pytest.raises(SiteError, match="resid_mid` does not exist in gpt_neox models with a "
                                        "parallel residual"):
        ii.patch_sweep(model, PROMPT, CORRUPT, METRIC, site="resid_mid")


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(positions=[15]), SiteError, "position 15 is out of range: there are 15 positions"),
    (dict(heads=[], site="head_out"), SiteError, "list of heads is empty"),
    (dict(direction="sideways"), InputError, "direction='sideways' is not one of"),
    (dict(method="attribution", window=3), InputError, "window applies to activation"),
    (dict(window=0), InputError, "window=0"),
])
def test_bad_arguments(unchanged, kwargs, error, message):
    with pytest.raises(error, match=message):
        ii.patch_sweep(unchanged, PROMPT, CORRUPT, METRIC, **kwargs)


def test_metric_errors(unchanged):
    with pytest.raises(InputError, match="needs a metric"):
        ii.patch_sweep(unchanged, PROMPT, CORRUPT)
    with pytest.raises(InputError, match="metric must be ii.logit_diff"):
        ii.patch_sweep(unchanged, PROMPT, CORRUPT, "logit_diff")
    with pytest.raises(InputError, match="2 answers for 1 prompts"):
        ii.patch_sweep(unchanged, PROMPT, CORRUPT, ii.logit_diff(["Mary", "John"], "John"))
    with pytest.raises(InputError, match="'Mary John' is 2 tokens"):
        ii.patch_sweep(unchanged, PROMPT, CORRUPT, ii.prob("Mary John"))
    with pytest.raises(InputError, match=r"metric `<lambda>` returned shape \[1, 15\]"):
        ii.patch_sweep(unchanged, PROMPT, CORRUPT, lambda logits: logits[..., 0])


def test_causal_tracing_needs_a_subject_it_can_find(unchanged):
    with pytest.raises(InputError, match="needs subject="):
        ii.patch_sweep(unchanged, PROMPT, method="noise")
    with pytest.raises(InputError, match="subject 'Paris' is not in prompt 0"):
        ii.patch_sweep(unchanged, PROMPT, method="noise", subject="Paris")


@pytest.mark.parametrize("method,fail_at", [("activation", 4), ("attribution", 1)])
@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_a_metric_failing_mid_sweep_loses_nothing(unchanged, method, fail_at, exception):
    demo = unchanged
    before = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, method=method, batch_size=4)
    bound = METRIC.bind(demo, 1)
    calls = []

    def flaky(logits):
        calls.append(1)
        if len(calls) == fail_at:
            raise exception("stop")
        return bound(logits)

    with pytest.raises(exception, match="stop"):
        ii.patch_sweep(demo, PROMPT, CORRUPT, ii.metric(flaky, positions=[-1]), method=method,
                       batch_size=4)
    assert hook_count(demo.module) == 0
    after = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, method=method, batch_size=4)
    torch.testing.assert_close(after.raw, before.raw, atol=0, rtol=0)


def test_equal_baselines_warn_and_keep_raw(unchanged):
    with pytest.warns(UserWarning, match="cannot be normalised"):
        result = ii.patch_sweep(unchanged, PROMPT, PROMPT, METRIC, layers=[0])
    assert result.values.isnan().all() and not result.raw.isnan().any()


def test_causal_tracing_uses_an_adapter_given_by_hand(demo):
    module = tiny_model("gpt2", len(demo.tokenizer))
    model = ii.wrap(module, demo.tokenizer)
    args = dict(method="noise", subject="Mary", samples=2, site="mlp_out")
    expected = ii.patch_sweep(model, PROMPT, **args)
    by_hand = ii.Adapter("mine", blocks="transformer.h", final_norm="transformer.ln_f",
                         unembed="lm_head", embed="transformer.wte", attn="attn", mlp="mlp",
                         mid_norm="ln_2", head_proj="attn.c_proj", n_heads=4)
    module.config.model_type = "mystery"
    try:
        result = ii.patch_sweep(model, PROMPT, adapter=by_hand, **args)
    finally:
        module.config.model_type = "gpt2"
    torch.testing.assert_close(result.raw, expected.raw)


def test_tqdm_disable_turns_the_sweep_bar_off(monkeypatch):
    from ipy_intervene.infra.progress import progress_disabled

    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_disabled()
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert not progress_disabled()
    monkeypatch.delenv("TQDM_DISABLE")
    assert not progress_disabled()
