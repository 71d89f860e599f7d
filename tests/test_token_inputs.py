"""Token-id inputs: a list of 1-D id tensors (different lengths) is a batch of prompts padded
like strings, a 2-D tensor is a batch, a 1-D tensor one prompt; anything else is an
InputError that says what to pass. Checked against the same prompts as strings and against
each prompt run alone with plain hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from conftest import CORRUPT, LAYERS, PROMPT, SHORT, checksum, hook_count, hooks, layers

SHORT_CORRUPT = "Then , John and Mary had"
SOURCE = ("h = model.{top}.{name}[1].output\n"
          "logits = model.lm_head.output\n")


def ids_of(model: ii.Model, text: str) -> torch.Tensor:
    return model.to_tokens(text)[0]


def cell(arch: str) -> str:
    top, name = LAYERS[arch]
    return SOURCE.format(top=top, name=name)


def alone(model: ii.Model, arch: str, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer 1's output, logits) of ``text`` run alone, unpadded, with a plain hook."""
    seen = {}
    block = layers(model, arch)[1]
    record = (lambda m, a, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad(), hooks((block, record)):
        logits = model.module(ids_of(model, text)[None]).logits
    return seen["h"][0], logits[0]


def test_a_list_of_id_tensors_is_the_batch_of_those_prompts(arch_model):
    arch, model = arch_model
    texts = [PROMPT, SHORT]
    as_ids = [ids_of(model, t) for t in texts]
    assert len(as_ids[0]) != len(as_ids[1])
    by_ids, by_text = {}, {}
    ii.trace(model, cell(arch), as_ids, namespace=by_ids)
    ii.trace(model, cell(arch), texts, namespace=by_text)
    assert torch.equal(by_ids["h"], by_text["h"])
    assert torch.equal(by_ids["logits"], by_text["logits"])
    for row, text in enumerate(texts):
        h, logits = alone(model, arch, text)
        n = h.shape[0]
        torch.testing.assert_close(by_ids["h"][row, -n:], h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(by_ids["logits"][row, -n:], logits, atol=1e-5, rtol=1e-5)


def test_id_lists_pad_like_strings(demo):
    texts = [SHORT, PROMPT]
    a = demo.prepare([[ids_of(demo, t) for t in texts]]).kwargs
    b = demo.prepare([texts]).kwargs
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert int(a["attention_mask"][0].sum()) == len(ids_of(demo, SHORT))


def test_one_row_id_tensors_in_a_list_are_prompts_too(arch_model):
    arch, model = arch_model
    ns = {}
    prompts = [ids_of(model, PROMPT)[None], ids_of(model, SHORT)]   # [1, seq] and [seq]
    ii.trace(model, cell(arch), prompts, namespace=ns)
    assert ns["h"].shape[0] == 2
    for got, text in [(ns["h"][0], PROMPT), (ns["h"][1], SHORT)]:
        h, _ = alone(model, arch, text)
        torch.testing.assert_close(got[-h.shape[0]:], h, atol=1e-5, rtol=1e-5)


def test_a_2d_tensor_is_a_batch_and_a_1d_tensor_one_prompt(demo):
    one = ids_of(demo, PROMPT)
    assert demo.prepare([one]).kwargs["input_ids"].shape == (1, len(one))
    both = torch.stack([one, ids_of(demo, CORRUPT)])
    ns = {}
    ii.trace(demo, "logits = model.lm_head.output", both, namespace=ns)
    for row, text in enumerate([PROMPT, CORRUPT]):
        with torch.no_grad():
            expected = demo.module(ids_of(demo, text)[None]).logits[0]
        torch.testing.assert_close(ns["logits"][row], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda ids: ids[None, None], r"\[seq\] or \[batch, seq\].*shape \[1, 1, 15\]"),
    (lambda ids: ids.float(), r"torch.float32"),
    (lambda ids: [ids, SHORT], r"item 1 of the INPUT list is a str.*1-D integer tensor"),
    (lambda ids: [SHORT, ids], r"item 0 of the INPUT list is a str"),
    (lambda ids: [ids, ids.float()], r"item 1 .* torch.float32 tensor, not token ids"),
    (lambda ids: [ids, torch.stack([ids, ids])], r"item 1 .* shape \[2, 15\].*2-D tensor"),
    (lambda ids: [ids, ids[:0]], r"item 1 .* shape \[0\]"),
    (lambda ids: [ids, ids.bool()], r"torch.bool tensor, not token ids"),
    (lambda ids: [], r"empty list"),
])
def test_other_id_inputs_are_input_errors_that_say_what_to_pass(demo, make, match):
    ids = ids_of(demo, PROMPT)
    assert len(ids) == 15
    ns = {"keep": 1}
    before, weights = hook_count(demo.module), checksum(demo.module)
    with pytest.raises(InputError, match=match):
        ii.trace(demo, "h = model.transformer.h[1].output", make(ids), namespace=ns)
    assert ns == {"keep": 1, "model": demo}
    assert hook_count(demo.module) == before and checksum(demo.module) == weights


def test_the_magic_takes_a_list_of_id_tensors(shell, demo):
    shell.user_ns["ids_a"] = ids_of(demo, PROMPT)
    shell.user_ns["ids_b"] = ids_of(demo, SHORT)
    shell.run_cell("%%trace model [ids_a, ids_b]\nlogits = model.lm_head.output\n")
    got = shell.user_ns["logits"]
    for row, text in enumerate([PROMPT, SHORT]):
        with torch.no_grad():
            expected = demo.module(ids_of(demo, text)[None]).logits[0]
        torch.testing.assert_close(got[row, -len(expected):], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("site", ["resid_pre", "attn_out"])
def test_patch_sweep_on_id_lists_equals_the_same_prompts_as_strings(arch_model, site):
    arch, model = arch_model
    clean, corrupted = [PROMPT, SHORT], [CORRUPT, SHORT_CORRUPT]
    metric = ii.logit_diff("Mary", "John")
    by_text = ii.patch_sweep(model, clean, corrupted, metric, site=site)
    by_ids = ii.patch_sweep(model, [ids_of(model, t) for t in clean],
                            [ids_of(model, t) for t in corrupted], metric, site=site)
    torch.testing.assert_close(by_ids.per_prompt, by_text.per_prompt, atol=0, rtol=0)
    torch.testing.assert_close(by_ids.values, by_text.values, atol=0, rtol=0)
    # each prompt's row equals that prompt swept alone (no padding)
    for row in range(2):
        single = ii.patch_sweep(model, ids_of(model, clean[row]), ids_of(model, corrupted[row]),
                                metric, site=site)
        n = single.per_prompt.shape[1]  # [layers, positions, prompts]
        assert by_ids.per_prompt.shape[1] == 15 and (row == 0) == (n == 15)
        torch.testing.assert_close(by_ids.per_prompt[:, -n:, row], single.per_prompt[..., 0],
                                   atol=1e-5, rtol=1e-5)


def test_sweep_id_lists_must_still_align(demo):
    with pytest.raises(InputError, match="different token lengths"):
        ii.patch_sweep(demo, [ids_of(demo, PROMPT), ids_of(demo, SHORT)],
                       [ids_of(demo, CORRUPT), ids_of(demo, PROMPT)], ii.logit_diff("Mary", "John"))
    with pytest.raises(InputError, match="item 1 of the INPUT list is a str"):
        ii.patch_sweep(demo, [ids_of(demo, PROMPT), SHORT], [CORRUPT, SHORT_CORRUPT],
                       ii.logit_diff("Mary", "John"))


def test_float_tensor_lists_stay_positional_inputs_for_other_modules():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3)).eval()
    model = ii.wrap(net)
    x = torch.randn(2, 4)
    ns = {}
    ii.trace(model, "y = model[0].output", [x], namespace=ns)
    assert torch.equal(ns["y"], net(x).detach())
