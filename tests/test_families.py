"""The families of the site table beyond GPT-2 / NeoX / Llama: each map passes its self-check
on a real forward, and a resid_pre sweep and ``ii.cache`` on a padded batch of prompts of
different lengths equal plain hooks run one prompt at a time (fp32, 1e-5). Maps that fail the
self-check (a wrong hand map; families whose sublayer outputs are not what the block adds)
are refused with what failed and the ``ii.Adapter(...)`` line."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.arch.check import adapter_line
from ipy_intervene.arch.sites import adapter_for, get_path
from ipy_intervene.errors import SiteError

from conftest import tiny_family

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
             pad_token_id=1)
MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=32)
# model_type -> (config extras, expected mid_norm)
FAMILIES = {
    "gptj": (dict(rotary_dim=4), None),
    "mixtral": (MOE, "post_attention_layernorm"),
    "phi3": ({}, "post_attention_layernorm"),
    "olmo": ({}, "post_attention_layernorm"),
    "stablelm": (dict(use_parallel_residual=False), "post_attention_layernorm"),
    "stablelm-parallel": (dict(use_parallel_residual=True), None),
    "qwen2_moe": (MOE, "post_attention_layernorm"),
    "qwen3_moe": (MOE, "post_attention_layernorm"),
    "smollm3": ({}, "post_attention_layernorm"),
}
CLEAN = [[5, 9, 12, 20, 7, 30, 14], [8, 3, 40, 11], [21, 6, 17, 9, 25]]
CORRUPT = [[5, 9, 13, 20, 7, 31, 14], [8, 4, 40, 11], [21, 6, 18, 9, 25]]
GOOD, BAD = 12, 13


def ids(prompts):
    """A list of 1-D token-id tensors (the package left-pads them)."""
    return [torch.tensor(p) for p in prompts]


def build(model_type: str, vocab: int, **extra) -> torch.nn.Module:
    """A seeded 2-layer, 32-wide random model of ``model_type`` (skipped when absent)."""
    return tiny_family(model_type, vocab, **{**SHAPE, **extra})


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, demo):
    name = request.param
    extra, mid_norm = FAMILIES[name]
    module = build(name.split("-")[0], len(demo.tokenizer), **extra)
    return name, mid_norm, ii.wrap(module, demo.tokenizer)


def run_alone(module, adapter, ids, patch=None):
    """Logits of one prompt alone (no padding), with plain hooks; ``patch=(layer, pos, value)``
    replaces resid_pre at ``pos`` of block ``layer``. Returns (logits, resid_pre, resid_post)."""
    blocks = get_path(module, adapter.blocks)
    pre, post, handles = {}, {}, []
    for l, block in enumerate(blocks):
        def before(m, args, kwargs, l=l):
            x = args[0] if args else kwargs["hidden_states"]
            pre[l] = x.clone()
            if patch is not None and patch[0] == l:
                x = x.clone()
                x[:, patch[1]] = patch[2]
                return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
            return None
        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(
            lambda m, a, out, l=l: post.__setitem__(l, (out[0] if isinstance(out, tuple)
                                                        else out).clone())))
    try:
        with torch.no_grad():
            logits = module(input_ids=torch.tensor([ids])).logits
    finally:
        for h in handles:
            h.remove()
    return logits, pre, post


def test_the_family_map_passes_its_self_check(family):
    name, mid_norm, model = family
    adapter = adapter_for(model)
    assert adapter.name == name.split("-")[0] and adapter.mid_norm == mid_norm
    assert adapter.n_layers == 2 and adapter.n_heads == 4


def test_a_resid_pre_sweep_of_prompts_of_different_lengths_equals_one_prompt_at_a_time(family):
    name, _, model = family
    adapter = adapter_for(model)
    result = ii.patch_sweep(model, ids(CLEAN), ids(CORRUPT), ii.logit_diff(GOOD, BAD),
                            site="resid_pre")
    got = result.per_prompt                               # [layer, pos, prompt]
    width = max(len(p) for p in CLEAN)
    assert got.shape == (2, width, len(CLEAN))
    for i, (clean, corrupt) in enumerate(zip(CLEAN, CORRUPT)):
        pad = width - len(clean)
        _, clean_pre, _ = run_alone(model.module, adapter, clean)
        logits, _, _ = run_alone(model.module, adapter, corrupt)
        unpatched = float(logits[0, -1, GOOD] - logits[0, -1, BAD])
        for layer in range(2):
            for p in range(width):
                if p < pad:                               # a pad position: nothing to patch
                    expected = unpatched
                else:
                    value = clean_pre[layer][0, p - pad]
                    logits, _, _ = run_alone(model.module, adapter, corrupt,
                                             (layer, p - pad, value))
                    expected = float(logits[0, -1, GOOD] - logits[0, -1, BAD])
                assert float(got[layer, p, i]) == pytest.approx(expected, abs=1e-5), \
                    (name, i, layer, p)


def test_cached_resid_post_equals_one_prompt_at_a_time(family):
    name, _, model = family
    adapter = adapter_for(model)
    cache = ii.cache(model, ids(CLEAN), sites=["resid_post"])
    for i, prompt in enumerate(CLEAN):
        _, _, post = run_alone(model.module, adapter, prompt)
        for layer in range(2):
            torch.testing.assert_close(cache["resid_post", layer][i], post[layer][0],
                                       atol=1e-5, rtol=0)


# -- refusals ---------------------------------------------------------------------------------


def gpt2_map(**change) -> ii.Adapter:
    fields = dict(blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head",
                  embed="transformer.wte", attn="attn", mlp="mlp", mid_norm="ln_2",
                  head_proj="attn.c_proj", n_heads=4)
    return ii.Adapter("mine", **{**fields, **change})


@pytest.mark.parametrize("change, message", [
    (dict(mlp="attn"), r"layer 0: resid_mid \+ mlp_out == resid_post does not hold \(max "
                       r"difference [0-9.e-]+\).*check `mlp`"),
    (dict(mid_norm=None), r"layer 0: mid_norm=None says attention and the MLP read the same "
                          r"stream .*the block is serial"),
    (dict(mid_norm="ln_1"), r"layer 0: resid_pre \+ attn_out == resid_mid does not hold"),
    (dict(head_proj="attn.c_attn"), r"layer 0: head_proj's output == attention's output does "
                                    r"not hold"),
    (dict(final_norm="transformer.h.1.mlp"), r"the last block.s resid_post through "
                                             r"transformer.h.1.mlp, lm_head and the map's logit "
                                             r"transform .* is not the model's logits"),
    (dict(mlp="mlp.nothing"), r"a path of the map does not exist"),
    (dict(n_heads=2), r"n_heads=2, but the model's config says 4 attention heads"),
])
def test_a_wrong_map_by_hand_is_refused_with_what_failed_and_the_line_to_write(demo, change,
                                                                               message):
    from conftest import tiny_model

    model = ii.wrap(tiny_model("gpt2", len(demo.tokenizer)), demo.tokenizer)
    wrong = gpt2_map(**change)
    with pytest.raises(SiteError, match=r"the site map of 'mine' fails its check on this model: "
                                        + message) as error:
        ii.cache(model, ids([[5, 6, 7]]), adapter=wrong)
    assert "adapter=ii.Adapter('mine', blocks='transformer.h'" in str(error.value)
    with pytest.raises(SiteError, match=message):            # remembered: refused again
        adapter_for(model, wrong)
    assert adapter_for(model, gpt2_map()).name == "mine"     # the right map passes


def test_the_check_runs_one_forward_per_model_and_map(demo):
    from conftest import tiny_model

    model = ii.wrap(tiny_model("llama", len(demo.tokenizer)), demo.tokenizer)
    calls = []
    handle = model.module.model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        adapter_for(model)
        adapter_for(model)
        adapter_for(model.module)
    finally:
        handle.remove()
    assert calls == [1]


def test_the_adapter_line_rebuilds_the_map(demo):
    adapter = adapter_for(demo)
    line = adapter_line(adapter)
    assert line.startswith("ii.Adapter('gpt2', blocks='transformer.h', final_norm=")
    assert eval(line, {"ii": ii}).with_layers(demo.module) == adapter


LLAMA_MAP = dict(blocks="model.layers", final_norm="model.norm", unembed="lm_head",
                 embed="model.embed_tokens", attn="self_attn", mlp="mlp",
                 mid_norm="post_attention_layernorm", head_proj="self_attn.o_proj", n_heads=4)


@pytest.mark.parametrize("model_type, extra, change, message", [
    # post-norms: what attention and the MLP add is a norm's output, not theirs
    ("gemma2", {}, {}, r"layer 0: resid_pre \+ attn_out == resid_mid does not hold"),
    ("olmo2", {}, {}, r"layer 0: resid_pre \+ attn_out == resid_mid does not hold"),
    # residual, embedding and logit multipliers
    ("granite", dict(residual_multiplier=0.5), {}, r"resid_pre \+ attn_out == resid_mid"),
    ("granite", dict(embedding_multiplier=2.0), {}, r"before block 0 depends on the tokens"),
    ("granite", dict(logits_scaling=3.0), {}, r"is not the model's logits"),
    # one norm, parallel attention and MLP, then a logit scale
    ("cohere", {}, dict(mid_norm=None), r"is not the model's logits"),
])
def test_a_llama_map_that_leaves_out_what_the_family_does_fails_the_check(demo, model_type, extra,
                                                                          change, message):
    module = build(model_type, len(demo.tokenizer), **extra)
    with pytest.raises(SiteError, match=f"the site map of '{model_type}' fails its check on "
                                        f"this model: .*{message}"):
        adapter_for(module, ii.Adapter(model_type, **{**LLAMA_MAP, **change}))
