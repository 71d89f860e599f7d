"""Every site x direction of activation patching on GPT-2, NeoX and Llama shapes equals the
naive plain-hooks loop (within 1e-5: batching changes float order), with and without padding,
whatever the chunking."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from conftest import CORRUPT, PROMPT
from sweep_oracle import logit_diff, naive_activation, serial_neox

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out",
         "head_out_pos")
PADDED_CLEAN = [PROMPT, "Then , Mary and John had a drink"]
PADDED_CORRUPT = [CORRUPT, "Then , Mary and Tom had a drink"]


def check(model, arch, site, clean, corrupt, direction="denoising", **kw):
    good, bad = model.token_id("Mary"), model.token_id("John")
    result = ii.patch_sweep(model, clean, corrupt, ii.logit_diff("Mary", "John"), site=site,
                            direction=direction, **kw)
    a, b = model.prepare([clean]).kwargs, model.prepare([corrupt]).kwargs
    base, source = (b, a) if direction == "denoising" else (a, b)
    expected = naive_activation(model.module, arch, site, base, source, logit_diff(good, bad),
                                model.config.num_hidden_layers, 4)
    got = result.per_prompt.reshape(expected.shape)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    return result


@pytest.mark.parametrize("site", SITES)
def test_activation_patching_equals_naive_loop(arch_model, site):
    arch, model = arch_model
    if arch == "neox" and site == "resid_mid":
        model, arch = ii.wrap(serial_neox(len(model.tokenizer)), model.tokenizer), "neox"
    check(model, arch, site, PROMPT, CORRUPT)


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "head_out_pos"])
def test_noising_direction_equals_naive_loop(arch_model, site):
    arch, model = arch_model
    result = check(model, arch, site, PROMPT, CORRUPT, direction="noising")
    assert result.direction == "noising"


@pytest.mark.parametrize("site", ["resid_pre", "mlp_out", "head_out"])
def test_padded_batches_of_prompts_equal_naive_loop(arch_model, site):
    arch, model = arch_model
    check(model, arch, site, PADDED_CLEAN, PADDED_CORRUPT)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_chunking_does_not_change_results(arch_model, batch_size):
    arch, model = arch_model
    check(model, arch, "resid_post", PADDED_CLEAN, PADDED_CORRUPT, batch_size=batch_size)


def test_normalised_values_are_clean_one_corrupted_zero(demo):
    result = ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"))
    with torch.no_grad():
        logits = {p: demo.module(demo.to_tokens(p)).logits[0, -1] for p in (PROMPT, CORRUPT)}
    mary, john = demo.token_id("Mary"), demo.token_id("John")
    clean = float(logits[PROMPT][mary] - logits[PROMPT][john])
    corrupted = float(logits[CORRUPT][mary] - logits[CORRUPT][john])
    assert result.clean == pytest.approx(clean, abs=1e-5)
    assert result.corrupted == pytest.approx(corrupted, abs=1e-5)
    expected = (result.raw - corrupted) / (clean - corrupted)
    torch.testing.assert_close(result.values, expected, atol=1e-5, rtol=0)
    # patching the whole residual stream at layer 0 restores everything: the clean run
    s2 = 10
    assert result.values[0, s2] == pytest.approx(1.0, abs=1e-4)
    assert result.values[:, :s2].abs().max() < 1e-5  # identical prefix: no effect


def test_custom_metric_over_all_positions(arch_model):
    """A plain callable gets logits at every position; positions before a patch are reused."""
    arch, model = arch_model

    def mean_top(logits):
        return logits.max(-1).values.mean(-1)

    result = ii.patch_sweep(model, PROMPT, CORRUPT, mean_top, site="resid_pre")
    a, b = model.prepare([PROMPT]).kwargs, model.prepare([CORRUPT]).kwargs
    expected = naive_activation(model.module, arch, "resid_pre", b, a, mean_top, 3, 4)
    torch.testing.assert_close(result.per_prompt.reshape(expected.shape), expected,
                               atol=1e-5, rtol=0)


def test_layer_position_and_head_subsets(arch_model):
    arch, model = arch_model
    full = ii.patch_sweep(model, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"),
                          site="head_out_pos")
    part = ii.patch_sweep(model, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"),
                          site="head_out_pos", layers=[2, 0], positions=[-1, 10], heads=[3])
    assert part.values.shape == (2, 2, 1)
    assert part.layers == [2, 0] and part.positions == [14, 10] and part.heads == [3]
    expected = full.raw[[2, 0]][:, [14, 10]][:, :, [3]]
    torch.testing.assert_close(part.raw, expected, atol=1e-5, rtol=0)


def test_a_small_memory_budget_splits_the_grid_into_chunks(arch_model, monkeypatch):
    from ipy_intervene.sweep import memory, staircase

    arch, model = arch_model
    sizes = []
    run_chunk = staircase.Engine._run_chunk

    def spy(self, prefix, cells):
        sizes.append(len(cells))
        return run_chunk(self, prefix, cells)

    monkeypatch.setattr(staircase.Engine, "_run_chunk", spy)
    monkeypatch.setattr(memory, "budget", lambda device, fraction: 40_000)
    check(model, arch, "resid_pre", PADDED_CLEAN, PADDED_CORRUPT)
    assert max(sizes) < 3 and len(sizes) > 15  # 15 prefixes, several chunks for some


def llama_family(kind: str, vocab: int):
    """Tiny Mistral (sliding window 4, shorter than the prompt) and Qwen2 models."""
    import transformers

    torch.manual_seed(0)
    shape = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                 bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if kind == "mistral":
        config = transformers.MistralConfig(sliding_window=4, **shape)
        return transformers.MistralForCausalLM(config).eval()
    config = transformers.Qwen2Config(**shape)
    return transformers.Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "head_out_pos"])
def test_llama_family_members_equal_naive_loop(demo, kind, site):
    model = ii.wrap(llama_family(kind, len(demo.tokenizer)), demo.tokenizer)
    check(model, "llama", site, PADDED_CLEAN, PADDED_CORRUPT)


def test_per_prompt_answers(arch_model):
    arch, model = arch_model
    metric = ii.logit_diff(["Mary", "John"], ["John", "Mary"])
    result = ii.patch_sweep(model, PADDED_CLEAN, PADDED_CORRUPT, metric, site="mlp_out")
    good = torch.tensor([model.token_id("Mary"), model.token_id("John")])
    bad = torch.tensor([model.token_id("John"), model.token_id("Mary")])

    def per_prompt(logits):
        last = logits[:, -1]
        return last.gather(-1, good[:, None])[:, 0] - last.gather(-1, bad[:, None])[:, 0]

    a, b = model.prepare([PADDED_CLEAN]).kwargs, model.prepare([PADDED_CORRUPT]).kwargs
    expected = naive_activation(model.module, arch, "mlp_out", b, a, per_prompt, 3, 4)
    torch.testing.assert_close(result.per_prompt.reshape(expected.shape), expected,
                               atol=1e-5, rtol=0)


def test_cells_in_any_order_come_back_in_that_order(demo):
    """The engine runs a chunk sorted by join layer, and returns it in the order asked."""
    result = ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"))
    engine = result.patcher.engine()
    from ipy_intervene.sweep.staircase import GridCell

    cells = [GridCell((3,), 10), GridCell((0,), 10), GridCell((2,), 10), GridCell((1,), 10)]
    got = engine._run_chunk(10, cells)[:, 0]
    expected = result.raw[[3, 0, 2, 1], 10]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_metric_reading_an_early_position_ignores_later_patches(arch_model):
    """Cells patched after the metric's position reuse the corrupted logits there."""
    arch, model = arch_model

    @ii.metric(positions=[12])
    def top_at_12(logits):
        return logits[:, 0].max(-1).values

    result = ii.patch_sweep(model, PROMPT, CORRUPT, top_at_12, site="resid_pre")
    a, b = model.prepare([PROMPT]).kwargs, model.prepare([CORRUPT]).kwargs
    expected = naive_activation(model.module, arch, "resid_pre", b, a,
                                lambda logits: logits[:, 12].max(-1).values, 3, 4)
    torch.testing.assert_close(result.per_prompt.reshape(expected.shape), expected,
                               atol=1e-5, rtol=0)
