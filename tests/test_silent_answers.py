"""Mistakes that used to give a plausible number with no message are now clear errors:
an unknown word (read as ``<unk>`` by the demo's word-level tokenizer), in a prompt or an
answer, and a misspelled model kwarg (swallowed by the forward's ``**kwargs``)."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from conftest import CORRUPT, PROMPT, hook_count


def test_an_unknown_answer_word_is_an_error_not_unk(demo):
    with pytest.raises(InputError, match="does not know 'Jon'.*'<unk>'"):
        ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "Jon"))
    with pytest.raises(InputError, match="does not know 'Jon'"):
        demo.token_id("Jon")
    assert demo.token_id("John") == demo.tokenizer.convert_tokens_to_ids("John")


def test_an_unknown_answer_word_through_the_magic(shell):
    shell.user_ns.update(clean=PROMPT, corrupt=CORRUPT, _sweep=None)
    with pytest.raises(InputError, match="does not know 'Jon'"):
        shell.run_cell('%patch_sweep model --clean clean --corrupted corrupt '
                       '--metric logit_diff("Mary", "Jon") --quiet')
    assert shell.user_ns["_sweep"] is None


def test_an_unknown_prompt_word_is_an_error_naming_it(shell):
    prompt = PROMPT.replace("store", "stor")
    with pytest.raises(InputError, match="does not know 'stor'") as info:
        shell.run_cell(f'%%trace model "{prompt}"\nh = model.transformer.h[0].output\n')
    assert "h" not in shell.user_ns and hook_count(shell.user_ns["model"].module) == 0
    assert "to_str_tokens" in str(info.value)


def test_the_unknown_token_written_on_purpose_is_allowed(demo):
    ns = {"model": demo}
    ii.trace(demo, "logits = model.lm_head.output", "When Mary <unk> John", namespace=ns)
    assert "<unk>" in demo.to_str_tokens("When Mary <unk> John")
    assert ns["logits"].shape[1] == len(demo.to_str_tokens("When Mary <unk> John"))


def test_a_misspelled_model_kwarg_is_an_error(shell, demo):
    ids = demo.to_tokens(PROMPT)
    shell.user_ns["x"] = {"input_ids": ids, "attention_masks": torch.ones_like(ids)}
    with pytest.raises(InputError, match="`attention_masks` is not a parameter.*`attention_mask`"):
        shell.run_cell('%%trace model x\nlogits = model.lm_head.output\n')
    assert "logits" not in shell.user_ns


def test_a_correct_model_kwarg_still_works(demo):
    ids = demo.to_tokens(PROMPT)
    ns = {"model": demo}
    ii.trace(demo, "logits = model.lm_head.output",
             {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, namespace=ns)
    assert ns["logits"].shape == (1, 15, 198)


def _dropout_gpt2(demo):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(demo.tokenizer), n_positions=64, n_embd=32, n_layer=2,
                     n_head=4, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    return GPT2LMHeadModel(cfg).train()


def test_wrap_puts_a_training_model_in_eval_mode_and_says_so(demo):
    module = _dropout_gpt2(demo)
    with pytest.warns(UserWarning, match="eval mode"):
        model = ii.wrap(module, demo.tokenizer)
    assert not module.training
    runs = [ii.trace(model, "l = model.lm_head.output", PROMPT, namespace={"model": model})
            .names["l"] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_a_model_switched_to_train_mode_later_gets_a_warning(demo):
    module = _dropout_gpt2(demo)
    with pytest.warns(UserWarning):
        model = ii.wrap(module, demo.tokenizer)
    module.train()
    try:
        with pytest.warns(UserWarning, match="train mode"):
            ii.trace(model, "l = model.lm_head.output", PROMPT, namespace={"model": model})
        with pytest.warns(UserWarning, match="train mode"):
            ii.patch_sweep(model, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"), layers=[0],
                           positions=[10])
    finally:
        module.eval()
