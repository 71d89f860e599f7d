"""Loading, wrapping, the module tree and input batching."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError, SiteError
from conftest import PROMPT, SHORT, tiny_model


def test_demo_loads_through_from_pretrained(demo):
    assert type(demo.module).__name__ == "GPT2LMHeadModel"
    assert demo.config.n_layer == 4 and len(demo.transformer.h) == 4
    assert demo.transformer.h[-1].path == "transformer.h[3]"


def test_hub_code_path_roundtrips_through_a_folder(tmp_path, demo):
    module = tiny_model("llama", len(demo.tokenizer))
    module.save_pretrained(tmp_path, safe_serialization=True)
    demo.tokenizer.save_pretrained(tmp_path)
    loaded = ii.load_model(tmp_path)
    ids = demo.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded.module(ids).logits, module(ids).logits)
    assert (tmp_path / "model.safetensors").exists()


def test_envoy_tree_prints_like_torch_and_suggests(demo):
    assert repr(demo.transformer.h[0]) == repr(demo.module.transformer.h[0])
    with pytest.raises(SiteError, match="Did you mean `h`"):
        demo.transformer.hh
    with pytest.raises(SiteError, match="has 4 layers"):
        demo.transformer.h[4]
    assert demo.transformer.h[-4] is demo.transformer.h[0]


def test_wrap_is_idempotent_and_checks_type(demo):
    assert ii.wrap(demo) is demo
    with pytest.raises(ii.InterventionError, match="torch.nn.Module"):
        ii.wrap("gpt2")


@torch.no_grad()
def test_left_padding_gives_each_prompt_its_own_activations(demo):
    batch = demo.prepare([[PROMPT, SHORT]])
    logits = demo.module(**batch.kwargs).logits
    for row, text in enumerate([PROMPT, SHORT]):
        alone = demo.module(demo.to_tokens(text)).logits
        n = alone.shape[1]
        torch.testing.assert_close(logits[row, -n:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad, message", [
    ("", "empty prompt"),
    ([], "empty list"),
    (3.5, "got float"),
    ({"attention_mask": [1]}, "needs `input_ids`"),
    (torch.zeros(2, 3), "integer tensor"),
])
def test_bad_inputs_are_named(demo, bad, message):
    with pytest.raises(InputError, match=message):
        demo.prepare([bad])


def test_token_helpers(demo):
    assert demo.to_str_tokens("When Mary")[1:] == ["When", "Mary"]
    with pytest.raises(InputError, match="2 tokens"):
        demo.token_id("Mary John")


@torch.no_grad()
def test_device_map_and_dtype_load_paths(demo):
    model = ii.load_model("demo", device_map="cpu", dtype="float64")
    assert next(model.module.parameters()).dtype == torch.float64
    ns = {"model": model, "torch": torch}
    ii.trace(model, "model.transformer.h[1].output = torch.zeros(1, 4, 128)\n"
                    "h = model.transformer.h[1].output\nlogits = model.lm_head.output",
             "When Mary and", namespace=ns)
    assert ns["h"].dtype == torch.float64 and not ns["h"].any()  # the float32 write was cast
    handle = model.module.transformer.h[1].register_forward_hook(
        lambda m, a, o: torch.zeros_like(o))
    try:
        expected = model.module(model.to_tokens("When Mary and")).logits
    finally:
        handle.remove()
    assert torch.equal(ns["logits"], expected)
